"""``python -m jobs.synth --out OUT --items N ...``: ``forge-ray synth`` as a Ray job."""

from jobs import run_stage

if __name__ == "__main__":
    raise SystemExit(run_stage("synth"))
