"""``python -m jobs.train_gr ARGS...``: ``forge-ray train-gr`` as a Ray job."""

from jobs import run_stage

if __name__ == "__main__":
    raise SystemExit(run_stage("train-gr"))
