"""DVC stage `report`: leaderboard, plots and DVC metrics/plots files of the sweep."""

from stages.common import params, run_lst


def main() -> None:
    run_lst(["report", "runs/sweep", "--out", "reports", "--json"], params().get("data_dir"))


if __name__ == "__main__":
    main()
