"""``python -m jobs.train_sid ARGS...``: ``forge-ray train-sid`` as a Ray job."""

from jobs import run_stage

if __name__ == "__main__":
    raise SystemExit(run_stage("train-sid"))
