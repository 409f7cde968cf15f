"""Named configs as plain data: `pitlm <stage> --recipe NAME` loads `NAME.yaml` here (its `stage:` says whose)."""
