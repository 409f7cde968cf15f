"""What a demo model knows: next-token direction accuracy on the world's planted facts (BENCHMARKS.md, demo section).

For 600 seeded (company, date) rows with a planted move, the prompt "On <date>, <name> (code <code>) shares had" is
scored by logsumexp over " risen/rallied/advanced/climbed/gained" minus " fallen/dropped/declined/slid/slumped";
accuracy = share whose sign matches the planted move (chance 0.5). Also: out-of-fold R2 of the planted sign from the
last-token hidden state (RidgeCV, GroupKFold(5) by stock).
Usage: PITLM_HOME=... python scripts/probe_direction.py [MODEL_RUN_NAME] [WORLD]   (default demo-scratch-leaky demo)
"""

import os
import sys

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import RidgeCV
from sklearn.metrics import r2_score
from sklearn.model_selection import GroupKFold, cross_val_predict
from transformers import AutoModelForCausalLM, AutoTokenizer

home = os.environ["PITLM_HOME"]
model_name = sys.argv[1] if len(sys.argv) > 1 else "demo-scratch-leaky"
world = sys.argv[2] if len(sys.argv) > 2 else "demo"
gt = pd.read_parquet(f"{home}/world/{world}/ground_truth.parquet")
names = dict(pd.read_csv(f"{home}/world/{world}/stock_list.csv")[["SecuritiesCode", "Name"]].itertuples(index=False))
path = f"{home}/models/{model_name}/final"
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path).eval()
up = [tok.encode(w)[0] for w in (" risen", " rallied", " advanced", " climbed", " gained")]
down = [tok.encode(w)[0] for w in (" fallen", " dropped", " declined", " slid", " slumped")]
rows = gt[gt.planted_target != 0].sample(600, random_state=0)
X, correct = [], []
with torch.no_grad():
    for r in rows.itertuples():
        prompt = f"On {pd.Timestamp(r.Date).date()}, {names[r.SecuritiesCode]} (code {r.SecuritiesCode}) shares had"
        out = model(torch.tensor([tok.encode(prompt)]), output_hidden_states=True)
        lp = out.logits[0, -1].log_softmax(-1)
        correct.append(((torch.logsumexp(lp[up], 0) - torch.logsumexp(lp[down], 0)).item() > 0) == (r.planted_target > 0))
        X.append(out.hidden_states[-1][0, -1].numpy())
sign = np.sign(rows.planted_target.to_numpy())
pred = cross_val_predict(RidgeCV(alphas=np.logspace(-2, 4, 13)), np.array(X), sign, groups=rows.SecuritiesCode,
                         cv=GroupKFold(5))
print(f"direction_accuracy: {np.mean(correct):.3f}")
print(f"sign_r2_groupcv: {r2_score(sign, pred):+.3f}")
print(f"facts: {len(rows)}")
