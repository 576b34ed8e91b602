"""Probe 3: does the frozen correlation tensor separate present/absent? Logistic regression (5-fold CV) on
fixed per-episode statistics of corr restricted to the support's (pseudo or GT) foreground columns."""
import sys, json, torch, torch.nn.functional as F
from pathlib import Path
ROOT = Path(__file__).resolve().parents[3]  # the checkout
sys.path[:0] = [str(ROOT)]
OUT = ROOT / "runs/plateau"
OUT.mkdir(parents=True, exist_ok=True)
from fscs.config import load_config
from fscs.distributed import DistEnv
from fscs.train import Trainer
from fscs.model.attention import resize_support_mask

NB = int(sys.argv[1]) if len(sys.argv) > 1 else 60
cfg = load_config(None, [f"out_dir={OUT}", "name=probe", "data.num_workers=0", "train.regime=full",
                         "data.batch_size=8", "train.epochs=1", f"train.steps_per_epoch={NB}", "train.seed=5", f"data.shards={ROOT}/data/synthetic-5i"])
tr = Trainer(cfg, DistEnv()); model = tr.model
loader = tr._loader(); loader.set_epoch(0)
feats_all = {"pseudo": [], "gt": [], "none": []}; ys = []; fgfrac = {"pseudo": [], "gt": []}
with torch.no_grad():
    for batch in loader:
        pres = batch["presence"]
        f = model.encode_episode(batch["query_img"], batch["support_img"])
        ps, pq = model.pseudo_masks(f, pres)
        corr = f.corr.float()  # [B, C, Tq, 145]
        B, C = corr.shape[:2]
        img = corr[..., 1:]
        for name, m in (("pseudo", ps.flatten(0, 2).float()), ("gt", batch["support_mask"].flatten(0, 2).float()),
                        ("none", None)):
            if m is None:
                keep = torch.ones(B, img.shape[-1], dtype=torch.bool)
            else:
                keep = ~resize_support_mask(m, model.head.support_grid)  # [B, 144] True=fg kept
                fgfrac[name].append(keep.float().mean(1))
            km = keep[:, None, None, :]
            neg = torch.finfo(img.dtype).min
            mx_fg = img.masked_fill(~km, -2.0).amax(-1)          # [B,C,Tq] max cos to fg column
            mean_fg = (img * km).sum(-1) / km.sum(-1).clamp_min(1)  # [B,C,Tq]
            mean_bg = (img * ~km).sum(-1) / (~km).sum(-1).clamp_min(1)
            cls_col = corr[..., 0]
            stats = [mx_fg.amax(-1), mx_fg.mean(-1), mean_fg.amax(-1), mean_fg.mean(-1),
                     torch.quantile(mx_fg, 0.9, dim=-1), (mean_fg - mean_bg).amax(-1), cls_col.amax(-1), cls_col.mean(-1)]
            feats_all[name].append(torch.cat(stats, 1))  # [B, 8*C]
        ys.append(pres.flatten().float())
y = torch.cat(ys)
print("episodes", len(y), "present frac", float(y.mean()))
for k, v in fgfrac.items():
    if v: print(k, "support fg frac of 12x12 cols: mean", float(torch.cat(v).mean()))

def cv_logreg(X, y, folds=5, l2=1e-2):
    n = len(y); g = torch.Generator().manual_seed(0); perm = torch.randperm(n, generator=g)
    accs, aucs, ces = [], [], []
    for i in range(folds):
        te = perm[i::folds]; trm = torch.ones(n, dtype=torch.bool); trm[te] = False
        Xtr, ytr, Xte, yte = X[trm], y[trm], X[te], y[te]
        mu, sd = Xtr.mean(0), Xtr.std(0) + 1e-6
        Xtr, Xte = (Xtr - mu) / sd, (Xte - mu) / sd
        w = torch.zeros(X.shape[1], requires_grad=True); b = torch.zeros(1, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")
        def clo():
            opt.zero_grad(); l = F.binary_cross_entropy_with_logits(Xtr @ w + b, ytr) + l2 * (w * w).sum(); l.backward(); return l
        opt.step(clo)
        with torch.no_grad():
            s = Xte @ w + b
            accs.append(float(((s > 0).float() == yte).float().mean()))
            ces.append(float(F.binary_cross_entropy_with_logits(s, yte)))
            pos, negs = s[yte == 1], s[yte == 0]
            aucs.append(float((pos[:, None] > negs[None, :]).float().mean()))
    return sum(accs) / folds, sum(aucs) / folds, sum(ces) / folds

res = {}
C = feats_all["gt"][0].shape[1] // 8
for name in feats_all:
    X = torch.cat(feats_all[name])
    res[name] = {"all8stats": cv_logreg(X, y)}
    # single scalar: max over channels of the max-cos-to-fg
    for j, sname in enumerate(["max_q max_fg", "mean_q max_fg", "max_q mean_fg", "mean_q mean_fg", "q90 max_fg",
                               "max_q fg-bg", "max_q clscol", "mean_q clscol"]):
        res[name][sname] = cv_logreg(X[:, j * C:(j + 1) * C], y)
for name, r in res.items():
    for s, (a, auc, ce) in r.items():
        print(f"{name:6s} {s:16s} acc {a:.3f} auc {auc:.3f} ce {ce:.3f}")
json.dump({"n": len(y), "res": res}, open(f"{OUT}/probe_signal.json", "w"), indent=1)
