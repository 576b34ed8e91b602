"""Intervention test: label-balanced batches (4 present + 4 absent of 8) vs the plain stream, weak step.
usage: balanced.py SEED STEPS MODE(plain|balanced) -> CE(cls) windows + held-out AUC/CE of the classifier"""
import sys, json, time, torch, torch.nn.functional as F
from pathlib import Path
ROOT = Path(__file__).resolve().parents[3]  # the checkout
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks/quality")]
OUT = ROOT / "runs/plateau"
OUT.mkdir(parents=True, exist_ok=True)
from fscs.config import load_config
from fscs.distributed import DistEnv
from fscs.train import Trainer
from cls_plateau import variant_loss
seed, steps, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
common = [f"out_dir={OUT}", "data.num_workers=0", "train.regime=full", "data.batch_size=8", "train.epochs=1",
          f"data.shards={ROOT}/data/synthetic-5i"]
cfg = load_config(None, common + ["name=bal", f"train.steps_per_epoch={2 * steps + 20}", f"train.seed={seed}"])
tr = Trainer(cfg, DistEnv()); model, engine, head = tr.model, tr.engine, tr.model.head
def split(b):
    n = b["presence"].shape[0]
    return [{k: v[i:i + 1] for k, v in b.items()} for i in range(n)]
def cat(eps): return {k: torch.cat([e[k] for e in eps]) for k in eps[0]}
def batches():
    ld = tr._loader(); ld.set_epoch(0); pos, neg = [], []
    for b in ld:
        if mode == "plain":
            yield b; continue
        for e in split(b): (pos if int(e["presence"].flatten()[0]) else neg).append(e)
        while len(pos) >= 4 and len(neg) >= 4:
            yield cat(pos[:4] + neg[:4]); del pos[:4]; del neg[:4]
ce, seg = [], []; t0 = time.time()
for step, b in enumerate(batches()):
    if step >= steps: break
    loss, parts = variant_loss(model, engine.module, b, "pseudo", "pseudo", 0.1, 1.0); engine.step(loss)
    ce.append(float(parts["cls"])); seg.append(float(parts["seg"]))
W = 25; win = [round(sum(ce[i:i + W]) / W, 3) for i in range(0, len(ce), W)]
hcfg = load_config(None, common + ["name=held", "train.steps_per_epoch=20", "train.seed=1234"])
h = Trainer.__new__(Trainer); h.cfg = hcfg; h.env = DistEnv(); h.engine = engine; h.use_masks = True
hl = Trainer._loader(h); hl.set_epoch(0); D, Y, SC = [], [], []
with torch.no_grad():
    for b in hl:
        f = model.encode_episode(b["query_img"], b["support_img"]); ps, pq = model.pseudo_masks(f, b["presence"])
        cls, s = head(f.corr, ps.flatten(0, 2), model.backbone.grid, f.size)
        D.append(cls); Y.append(b["presence"].flatten().long()); SC.append(F.cross_entropy(s, pq.flatten(0, 1).long()))
cls, y = torch.cat(D), torch.cat(Y); d = cls[:, 1] - cls[:, 0]
auc = float(((d[y == 1][:, None] > d[y == 0][None]).float()).mean())
out = {"seed": seed, "mode": mode, "ce_windows": win, "held_cls_ce": float(F.cross_entropy(cls, y)), "held_auc": auc,
       "held_acc": float(((d > 0).long() == y).float().mean()), "held_d_std": float(d.std()),
       "held_seg_ce_pseudo": float(torch.stack(SC).mean()), "seg_last50": sum(seg[-50:]) / 50, "sec": time.time() - t0}
print(json.dumps(out)); json.dump(out, open(f"{OUT}/bal_{mode}_s{seed}_{steps}.json", "w"))
