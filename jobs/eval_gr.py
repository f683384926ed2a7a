"""``python -m jobs.eval_gr ARGS...``: ``forge-ray eval-gr`` as a Ray job."""

from jobs import run_stage

if __name__ == "__main__":
    raise SystemExit(run_stage("eval-gr"))
