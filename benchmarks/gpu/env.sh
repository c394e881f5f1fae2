# Sourced on the device machine by smoke.sh and run.sh: the project and the carried wheels on the path.
export PYTHONPATH="$PWD:/tmp/site" LST_DATA_DIR="$PWD/.dev/data" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
lst() { python3 -m pipeline.cli "$@"; }
# No CPU buffer cache there: compiling it (~30 s of a 15-minute lease) buys nothing when the steps run on the GPU.
export LST_CPU_CACHE=0
