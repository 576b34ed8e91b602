"""Gradient signal-to-noise of CE(cls) at batch 8: per-batch gradients over 20 held batches.
For cls_out: share of the per-batch gradient (present-minus-absent row) along the common-mode direction (mean pooled
feature) and label-imbalance correlation. usage: snr.py SEED STEPS VARIANT(weak|full)"""
import sys, json, torch, torch.nn.functional as F
from pathlib import Path
ROOT = Path(__file__).resolve().parents[3]  # the checkout
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks/quality")]
OUT = ROOT / "runs/plateau"
OUT.mkdir(parents=True, exist_ok=True)
from fscs.config import load_config
from fscs.distributed import DistEnv
from fscs.train import Trainer
from cls_plateau import variant_loss
seed, steps, variant = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
sup = "gt" if variant == "full" else "pseudo"
common = [f"out_dir={OUT}", "data.num_workers=0", "train.regime=full", "data.batch_size=8", "train.epochs=1",
          f"data.shards={ROOT}/data/synthetic-5i"]
cfg = load_config(None, common + ["name=snr", f"train.steps_per_epoch={max(steps,1)}", f"train.seed={seed}"])
tr = Trainer(cfg, DistEnv()); model, engine, head = tr.model, tr.engine, tr.model.head
if steps:
    ld = tr._loader(); ld.set_epoch(0)
    for b in ld:
        loss, _ = variant_loss(model, engine.module, b, sup, sup, 0.1, 1.0); engine.step(loss)
hcfg = load_config(None, common + ["name=held", "train.steps_per_epoch=20", "train.seed=1234"])
h = Trainer.__new__(Trainer); h.cfg = hcfg; h.env = DistEnv(); h.engine = engine; h.use_masks = True
hl = Trainer._loader(h); hl.set_epoch(0)
feat = {}
head.cls_out.register_forward_hook(lambda m, i, o: feat.__setitem__("f", i[0]))
groups = {"cls_out": [head.cls_out.weight], "cls_branch": [p for n, p in head.named_parameters() if n.startswith("cls_")],
          "trunk": [p for n, p in head.named_parameters() if n.startswith(("blocks", "mix"))]}
G = {k: [] for k in groups}; fs, imb, ys = [], [], []
for b in hl:
    f = model.encode_episode(b["query_img"], b["support_img"])
    with torch.no_grad(): ps, _ = model.pseudo_masks(f, b["presence"])
    m = ps.flatten(0, 2) if sup == "pseudo" else b["support_mask"].flatten(0, 2).float()
    cls, _ = head(f.corr, m, model.backbone.grid, f.size)
    y = b["presence"].flatten().long()
    lc = 0.1 * F.cross_entropy(cls, y)
    fs.append(feat["f"].detach().mean((2, 3))); ys.append(y.float())
    p = cls.softmax(1)[:, 1].detach(); imb.append(float((p - y.float()).sum()))
    for k, ps_ in groups.items():
        gr = torch.autograd.grad(lc, ps_, retain_graph=True)
        G[k].append(torch.cat([x.flatten() for x in gr]))
out = {"seed": seed, "steps": steps, "variant": variant}
for k, gl in G.items():
    g = torch.stack(gl); mean = g.mean(0)
    out[k] = {"mean_grad_norm": float(mean.norm()), "per_batch_norm": float(g.norm(dim=1).mean()),
              "snr_per_batch": float(mean.norm() ** 2 / (g - mean).pow(2).sum(1).mean())}
g = torch.stack(G["cls_out"]).view(len(imb), 2, -1); gd = g[:, 1] - g[:, 0]   # present-minus-absent row
fall = torch.cat(fs); fbar = fall.mean(0); u = fbar / fbar.norm()
comp = (gd @ u)
y = torch.cat(ys)
out["cls_out_common_mode_share"] = float((comp ** 2).sum() / (gd ** 2).sum())
out["corr_commonmode_grad_vs_batch_imbalance"] = float(torch.corrcoef(torch.stack([comp, torch.tensor(imb)]))[0, 1])
out["pooled_feat_norm_mean"] = float(fall.norm(dim=1).mean())
out["pooled_feat_across_episode_std_norm"] = float(fall.std(0).norm())
out["pooled_feat_class_mean_diff_norm"] = float((fall[y == 1].mean(0) - fall[y == 0].mean(0)).norm())
print(json.dumps(out))
json.dump(out, open(f"{OUT}/snr_{variant}_s{seed}_{steps}.json", "w"), indent=1)
