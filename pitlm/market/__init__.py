"""Market data: loaders (Kaggle JPX, generic CSV, the synthetic world) into one normalised panel, plus the
features and the seeded row sample that eval uses.

    jpx.py       Kaggle JPX CSVs: validation, AdjustmentFactor adjustment, Target recomputation, Kaggle download
    generic.py   long-format daily prices of any market
    rows.py      the row validation both loaders share: kinds of invalid row, --on-invalid error|drop
    panel.py     save_panel / load_panel: market/<name>/panel.parquet + manifest.json
    features.py  panel schema, features, sample_rows
    cli.py       `pitlm market jpx|csv|world NAME`
"""
