"""Probes 1+2: weak-regime training (same step as train.regime=weak via cls_plateau.variant_loss(pseudo,pseudo))
with diagnostics of the classification branch on a fixed held-out batch, and per-loss gradient norms.
usage: dyn.py SEED STEPS VARIANT   (VARIANT: base | <intervention names below>)"""
import sys, json, math, time, torch, torch.nn.functional as F
from pathlib import Path
ROOT = Path(__file__).resolve().parents[3]  # the checkout
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks/quality")]
OUT = ROOT / "runs/plateau"
OUT.mkdir(parents=True, exist_ok=True)
from fscs.config import load_config
from fscs.distributed import DistEnv
from fscs.train import Trainer
from fscs.losses import fscs_loss
from cls_plateau import variant_loss

seed, steps, variant = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
support = target = "pseudo"
if variant == "full": support = target = "gt"
DIAG = {0, 25, 50, 100, 150, 200, 300, 400, steps}
common = [f"out_dir={OUT}", "data.num_workers=0", "train.regime=full", "data.batch_size=8",
          "train.epochs=1", f"data.shards={ROOT}/data/synthetic-5i"]
cfg = load_config(None, common + [f"name=dyn{seed}{variant}", f"train.steps_per_epoch={steps}", f"train.seed={seed}"])
tr = Trainer(cfg, DistEnv()); model, engine = tr.model, tr.engine
head = model.head

# ---- interventions (applied before training; engine's optimizer holds the same Parameter objects)
with torch.no_grad():
    if variant == "clsout0":      # zero-init the classifier's last conv
        head.cls_out.weight.zero_(); head.cls_out.bias.zero_()
    elif variant == "maxpool":    # not an init change: recorded only if used
        pass

# ---- fixed held-out batch (different seed's stream)
hcfg = load_config(None, common + ["name=held", "train.steps_per_epoch=20", "train.seed=1234"])
htr_loader = Trainer.__new__(Trainer); htr_loader.cfg = hcfg; htr_loader.env = DistEnv(); htr_loader.engine = engine; htr_loader.use_masks = True
hl = Trainer._loader(htr_loader); hl.set_epoch(0)
held = []
with torch.no_grad():
    for b in hl:
        f = model.encode_episode(b["query_img"], b["support_img"]); ps, pq = model.pseudo_masks(f, b["presence"])
        held.append((f, ps.flatten(0, 2), b["presence"].flatten().float()))

acts = {}
def _tail_init(q):
    h = head.cls_conv1.register_forward_hook(lambda m, i, o: acts.__setitem__("pre1", o.detach()))
    with torch.no_grad():
        pre = []
        for f, ps, y in held[:6]:
            head(f.corr, ps, model.backbone.grid, f.size); pre.append(acts["pre1"].transpose(0, 1).flatten(1))
        pre = torch.cat(pre, 1)
        t = torch.quantile(pre[:, ::7], q, dim=1)
        head.cls_conv1.bias -= t
    h.remove()
if variant.startswith("tail"):
    _tail_init(int(variant[4:]) / 100)
def hook(name):
    def h(m, i, o): acts[name] = o.detach()
    return h
for n in ["mix_norm2", "cls_conv1", "cls_conv2", "cls_conv3", "cls_out"]:
    getattr(head, n).register_forward_hook(hook(n))

def auc(s, y):
    p, n = s[y == 1], s[y == 0]
    return float(((p[:, None] > n[None]).float() + 0.5 * (p[:, None] == n[None]).float()).mean())

def cv_logreg(X, y, folds=5, l2=3e-2):
    n = len(y); perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)); aucs, ces = [], []
    for i in range(folds):
        te = perm[i::folds]; m = torch.ones(n, dtype=torch.bool); m[te] = False
        mu, sd = X[m].mean(0), X[m].std(0) + 1e-6; Xtr, Xte = (X[m] - mu) / sd, (X[te] - mu) / sd
        w = torch.zeros(X.shape[1], requires_grad=True); b = torch.zeros(1, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=100, line_search_fn="strong_wolfe")
        def clo():
            opt.zero_grad(); l = F.binary_cross_entropy_with_logits(Xtr @ w + b, y[m]) + l2 * (w * w).sum(); l.backward(); return l
        with torch.enable_grad(): opt.step(clo)
        with torch.no_grad():
            s_ = Xte @ w + b; aucs.append(auc(s_, y[te])); ces.append(float(F.binary_cross_entropy_with_logits(s_, y[te])))
    return [sum(aucs) / folds, sum(ces) / folds]

def diagnose():
    head.eval()
    D, Y, CM, dead = [], [], [], {k: [] for k in ["cls_conv1", "cls_conv2", "cls_conv3"]}
    gn_neg, spat, PF, PI, SM, SA = [], [], [], [], [], []
    with torch.no_grad():
        for f, ps, y in held:
            cls, _ = head(f.corr, ps, model.backbone.grid, f.size)
            D.append(cls[:, 1] - cls[:, 0]); Y.append(y)
            g = acts["mix_norm2"][..., 0]            # [B,128,Tq] pre-ReLU CLS slot
            cm = F.relu(g)
            CM.append(cm.mean(-1))                    # episode-mean CLS-map vector
            im = F.relu(acts["mix_norm2"][..., 1])
            PF.append(torch.cat([cm.mean(-1), cm.amax(-1), cm.std(-1)], 1)); PI.append(torch.cat([im.mean(-1), im.amax(-1), im.std(-1)], 1))
            fg = _.softmax(1)[:, 1].flatten(1); SM.append(fg.amax(1)); SA.append(fg.mean(1))
            spat.append(cm.std(-1).mean(1))           # spatial std within episode
            gn_neg.append((g <= 0).float().mean())
            for k in dead:
                a = F.relu(acts[k])                   # [B,C,h,w]
                dead[k].append(a.flatten(2).amax(-1))  # [B,C] max activation per episode
    head.train()
    d, y, cm = torch.cat(D), torch.cat(Y), torch.cat(CM)
    mu_p, mu_a = cm[y == 1].mean(0), cm[y == 0].mean(0)
    within = torch.cat([cm[y == 1] - mu_p, cm[y == 0] - mu_a]).pow(2).sum(1).mean().sqrt()
    cos = F.cosine_similarity(cm[:, None], cm[None], dim=-1)
    out = {"d_mean": float(d.mean()), "d_std": float(d.std()), "d_auc": auc(d, y),
           "d_gap": float(d[y == 1].mean() - d[y == 0].mean()),
           "clsmap_between_over_within": float((mu_p - mu_a).norm() / within),
           "clsmap_episode_norm": float(cm.norm(dim=1).mean()),
           "clsmap_across_episode_std": float(cm.std(0).mean()),
           "clsmap_within_episode_spatial_std": float(torch.cat(spat).mean()),
           "clsmap_mean_pairwise_cos": float(cos.mean()),
           "seg_maxfg_auc": auc(torch.cat(SM), y), "seg_meanfg_auc": auc(torch.cat(SA), y),
           "probe_clsmap": cv_logreg(torch.cat(PF), y), "probe_imgmap": cv_logreg(torch.cat(PI), y),
           "probe_clsmap_meanonly": cv_logreg(torch.cat(PF)[:, :128], y), "probe_clsmap_maxonly": cv_logreg(torch.cat(PF)[:, 128:256], y),
           "mix2_cls_frac_nonpos": float(torch.stack(gn_neg).mean())}
    for k, v in dead.items():
        mx = torch.cat(v)  # [E,C]
        out[f"{k}_dead_units"] = float((mx.amax(0) <= 0).float().mean())
        out[f"{k}_zero_frac_epmax"] = float((mx <= 0).float().mean())
    return out

groups = {"cls_branch": [p for n, p in head.named_parameters() if n.startswith("cls_")],
          "mix": [p for n, p in head.named_parameters() if n.startswith("mix_")],
          "blocks": [p for n, p in head.named_parameters() if n.startswith("blocks")],
          "seg_branch": [p for n, p in head.named_parameters() if n.startswith("seg_")]}
def gnorms(loss):
    out = {}
    for g, ps in groups.items():
        gr = torch.autograd.grad(loss, ps, retain_graph=True, allow_unused=True)
        out[g] = math.sqrt(sum(float(x.pow(2).sum()) for x in gr if x is not None))
    return out

loader = tr._loader(); loader.set_epoch(0)
log = {"seed": seed, "variant": variant, "ce": [], "seg": [], "diag": {}}
t0 = time.time()
for step, batch in enumerate(loader):
    if step in DIAG:
        dg = diagnose()
        presence = batch["presence"]
        feats = model.encode_episode(batch["query_img"], batch["support_img"])
        with torch.no_grad(): ps_, pq_ = model.pseudo_masks(feats, presence)
        cls, seg = head(feats.corr, ps_.flatten(0, 2), model.backbone.grid, feats.size)
        _, parts = fscs_loss(cls.view(*presence.shape, 2), seg.view(*presence.shape, 2, *feats.size), presence, pq_.long())
        lc = 0.1 * F.cross_entropy(cls, presence.flatten().long())
        ls = F.cross_entropy(seg, pq_.flatten(0, 1).long())
        dg["grad_from_0.1CEcls"] = gnorms(lc); dg["grad_from_CEseg"] = gnorms(ls)
        log["diag"][step] = dg
        print(step, json.dumps(dg), flush=True)
    loss, parts = variant_loss(model, engine.module, batch, support, target, cfg.train.cls_weight, cfg.train.seg_fg_weight)
    engine.step(loss)
    log["ce"].append(float(parts["cls"])); log["seg"].append(float(parts["seg"]))
    if (step + 1) % 25 == 0:
        print(f"step {step+1} ce25 {sum(log['ce'][-25:])/25:.3f} seg25 {sum(log['seg'][-25:])/25:.3f} t {time.time()-t0:.0f}s", flush=True)
dg = diagnose(); log["diag"]["end"] = dg; print("end", json.dumps(dg))
json.dump(log, open(f"{OUT}/dyn_{variant}_s{seed}_{steps}.json", "w"))
