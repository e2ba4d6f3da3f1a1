"""Steps/s of a `quorum train` run, counted as ../shared/peers/side_by_side.sh counts them:
from step 20 to the last step in RUN_DIR/metrics.csv (the first steps, which start the
workers, left out). Imported by the experiment scripts' summaries (run from the repository
root: `sys.path.insert(0, "experiments")`). Standard library only."""
import csv


def steps_per_s(run_dir):
    t = {int(r["step"]): float(r["seconds"]) for r in csv.DictReader(open(f"{run_dir}/metrics.csv"))}
    last = max(t)
    return (last - 20) / (t[last] - t[20])
