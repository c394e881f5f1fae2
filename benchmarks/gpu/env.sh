# Sourced on the device machine by smoke.sh and run.sh: the project and the carried wheels on the path.
export PYTHONPATH="$PWD:/tmp/site" LST_DATA_DIR="$PWD/.dev/data" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
lst() { python3 -m pipeline.cli "$@"; }
