"""Tests for semiseg.models (backbones, DeepLab variants, heads, attention)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from semiseg.models import (ClassAttention, MLPHead, build_model, efficientnet_lite0)
from semiseg.models import deeplab as deeplab_mod
from semiseg.models.efficientnet_lite import (EFFNET_LITE_MEAN, EFFNET_LITE_STD,
                                              EfficientNetLite0,
                                              efficientnet_lite0_weights_path)

from conftest import randomised_attention

torch.set_num_threads(2)
ARCH_NAMES = ["effnet_lite0_dlv3p", "deeplabv2_r101", "deeplabv3p_r50"]


# --------------------------------------------------------------------------- EfficientNet-Lite0
def test_effnet_lite0_classifies_cat():
    skdata = pytest.importorskip("skimage.data")
    img = torch.from_numpy(skdata.chelsea()).permute(2, 0, 1).float()[None] / 255.0
    img = F.interpolate(img, size=(224, 224), mode="bilinear", align_corners=False,
                        antialias=True)
    x = (img - torch.tensor(EFFNET_LITE_MEAN).view(1, 3, 1, 1)) / \
        torch.tensor(EFFNET_LITE_STD).view(1, 3, 1, 1)
    model = efficientnet_lite0(pretrained=True).eval()
    with torch.no_grad():
        top5 = model(x).topk(5, dim=1).indices[0].tolist()
    assert any(281 <= c <= 285 for c in top5), top5
    assert 281 <= top5[0] <= 285, top5  # in practice top-1 is a cat (285, Egyptian cat)


def test_effnet_lite0_strict_load_and_differs_from_random():
    sd = torch.load(efficientnet_lite0_weights_path(), map_location="cpu")
    model = EfficientNetLite0(num_classes=1000)
    res = model.load_state_dict(sd, strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    assert set(model.state_dict().keys()) == set(sd.keys())
    rnd = EfficientNetLite0(num_classes=1000)
    w_loaded = efficientnet_lite0(pretrained=True).state_dict()
    for k in ["_conv_stem.weight", "_blocks.5._depthwise_conv.weight", "_fc.weight"]:
        assert torch.equal(w_loaded[k], sd[k])
        assert not torch.allclose(rnd.state_dict()[k], sd[k])
    # segmentation backbone loads all non-head weights
    seg = build_model("effnet_lite0_dlv3p", num_classes=3, pretrained=True)
    bsd = seg.backbone.state_dict()
    assert torch.equal(bsd["_blocks.15._project_conv.weight"], sd["_blocks.15._project_conv.weight"])
    assert not any(k.startswith(("_conv_head", "_fc")) for k in bsd)


@pytest.mark.parametrize("os_", [8, 16, 32])
def test_effnet_output_stride(os_):
    m = EfficientNetLite0(num_classes=None, output_stride=os_).eval()
    with torch.no_grad():
        f = m.forward_features(torch.randn(1, 3, 64, 64))
    assert f["out"].shape[-1] == 64 // os_
    assert f["s8"].shape[-1] == 8 and f["s4"].shape[-1] == 16


# --------------------------------------------------------------------------- SegModels
@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {a: build_model(a, num_classes=5, pretrained=(a == "effnet_lite0_dlv3p"))
            for a in ARCH_NAMES}


def _manual_forward(m, arch, x):
    """(logits, feats) by hand from the submodules, with the backbone's normalisation written out."""
    mean, std = ((EFFNET_LITE_MEAN, EFFNET_LITE_STD) if arch == "effnet_lite0_dlv3p"
                 else ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    b = m.backbone
    if arch == "effnet_lite0_dlv3p":
        f = b.forward_features(x)
        feats = m.decoder(f["out"], f["s8"], f["s8"].shape[-2:])
    else:
        low = b.layer1(b.maxpool(b.relu(b.bn1(b.conv1(x)))))
        high = b.layer4(b.layer3(b.layer2(low)))
        feats = high if arch == "deeplabv2_r101" else m.decoder(high, low, high.shape[-2:])
    return _manual_classify(m, arch, feats), feats


def _manual_classify(m, arch, feats):
    """The classification layer alone: DeepLabv2's sum of four dilated 3x3 convs, else a 1x1 conv."""
    if arch == "deeplabv2_r101":
        return sum(F.conv2d(feats, c.weight, c.bias, padding=d, dilation=d)
                   for c, d in zip(m.classifier.convs, (6, 12, 18, 24)))
    return F.conv2d(feats, m.classifier.weight, m.classifier.bias)


def _close(a, b, tol=1e-5):
    return a.shape == b.shape and torch.allclose(a, b, rtol=tol, atol=tol * float(b.abs().max()))


@pytest.mark.parametrize("arch", ARCH_NAMES)
@pytest.mark.parametrize("hw", [(64, 64), (57, 70)])
def test_shapes_and_classify(models, arch, hw):
    m = models[arch].eval()
    H, W = hw
    x = torch.rand(2, 3, H, W)
    with torch.no_grad():
        logits, feats = m(x)
        manual_logits, manual_feats = _manual_forward(m, arch, x)
        classified = m.classify(feats)
        by_hand = _manual_classify(m, arch, feats)
    h, w = math.ceil(H / 8), math.ceil(W / 8)
    assert logits.shape == (2, 5, h, w)
    assert feats.shape == (2, m.feat_dim, h, w)
    assert m.output_stride == 8 and m.num_classes == 5
    # classify is the classification layer and nothing else, forward is normalise -> f^- -> classify
    assert _close(classified, by_hand), "classify(feats) is not the classification layer"
    assert _close(feats, manual_feats), "feats differ from normalise -> backbone -> decoder by hand"
    assert _close(logits, manual_logits), "logits differ from the manual forward"
    # heads and attention operate on the features
    v = feats.permute(0, 2, 3, 1).reshape(-1, m.feat_dim)
    z = m.projection(v)
    p = m.prediction(z)
    assert z.shape == (v.shape[0], 256) and p.shape == (v.shape[0], 256)
    lab = torch.randint(0, 5, (v.shape[0],))
    s = m.attention_pred(p, lab)
    assert s.shape == (v.shape[0],)
    assert m.attention_proj(z, lab).shape == (v.shape[0],)


def test_feat_dims(models):
    assert models["deeplabv2_r101"].feat_dim == 2048
    assert models["deeplabv3p_r50"].feat_dim == 256
    assert models["effnet_lite0_dlv3p"].feat_dim == 256
    assert models["deeplabv2_r101"].projection.net[0].in_features == 2048


def test_deeplabv2_aspp_sums_all_four_branches(models):
    aspp = models["deeplabv2_r101"].classifier
    assert [c.dilation[0] for c in aspp.convs] == [6, 12, 18, 24]
    feats = torch.randn(1, 2048, 9, 9)
    with torch.no_grad():
        manual = sum(c(feats) for c in aspp.convs)
        partial = aspp.convs[0](feats) + aspp.convs[1](feats)
        out = aspp(feats)
    assert torch.allclose(out, manual, atol=1e-5)
    assert not torch.allclose(out, partial, atol=1e-5)


def test_normalisation_inside_model(models):
    m = models["deeplabv3p_r50"]
    assert torch.allclose(m.pixel_mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    e = models["effnet_lite0_dlv3p"]
    assert torch.allclose(e.pixel_mean.flatten(), torch.tensor(EFFNET_LITE_MEAN))
    assert "pixel_mean" not in e.state_dict()


def test_param_groups(models):
    for arch, m in models.items():
        assert [g["lr"] for g in m.param_groups(0.01)] == [0.01, 0.01]  # the paper: one learning rate
        groups = m.param_groups(0.01, head_lr_mult=10)
        assert [g["lr"] for g in groups] == [0.01, pytest.approx(0.1)]
        ids = [id(p) for g in groups for p in g["params"]]
        assert len(ids) == len(set(ids)) == len(list(m.parameters()))
        bb = {id(p) for p in m.backbone.parameters()}
        assert {id(p) for p in groups[0]["params"]} == bb
        new = {id(p) for p in groups[1]["params"]}
        for mod in (m.classifier, m.projection, m.prediction, m.attention_pred, m.attention_proj):
            assert {id(p) for p in mod.parameters()} <= new
        torch.optim.SGD(groups, lr=0.01, momentum=0.9)  # accepted by an optimizer


def test_ema_deepcopy_carries_heads(models):
    """semiseg.teacher.make_teacher: every parameter and buffer of the student, heads and attention
    included, with equal values, in storage of its own, frozen and in eval mode."""
    from semiseg import teacher as teacher_mod

    m = models["effnet_lite0_dlv3p"].train()
    t = teacher_mod.make_teacher(m)
    params, t_params = dict(m.named_parameters()), dict(t.named_parameters())
    buffers, t_buffers = dict(m.named_buffers()), dict(t.named_buffers())
    assert list(t_params) == list(params) and list(t_buffers) == list(buffers)
    for head in ("projection.", "prediction.", "attention_pred.", "attention_proj.", "classifier.", "decoder.",
                 "backbone."):
        assert any(n.startswith(head) for n in t_params), head
    for att in ("attention_pred", "attention_proj"):  # the 2 x C class-wise attention modules, stacked
        assert t_params[f"{att}.weight2"].shape == (5, 256) and t_params[f"{att}.weight1"].shape == (5, 256, 256)
        assert t_buffers[f"{att}.running_var"].shape == (5, 256)  # BatchNorm statistics included
    for name, p in params.items():
        q = t_params[name]
        assert torch.equal(q, p), f"{name}: teacher value differs from the student's"
        assert q.data_ptr() != p.data_ptr(), f"{name}: teacher shares the student's storage"
        assert not q.requires_grad, f"{name}: teacher parameter not frozen"
        assert p.requires_grad, f"{name}: student parameter frozen"
    for name, b in buffers.items():
        assert torch.equal(t_buffers[name], b), f"{name}: teacher buffer differs from the student's"
        assert t_buffers[name].data_ptr() != b.data_ptr(), f"{name}: teacher shares the student's buffer"
    assert not t.training and m.training
    # separate storage: changing the teacher leaves the student alone
    with torch.no_grad():
        t.attention_proj.weight1[2].add_(1.0)
        t.backbone._bn0.running_mean.add_(1.0)
    assert not torch.equal(t.attention_proj.weight1[2], m.attention_proj.weight1[2])
    assert not torch.equal(t.backbone._bn0.running_mean, m.backbone._bn0.running_mean)
    m.eval()


def test_effnet_seg_train_step_backward():
    torch.manual_seed(0)
    m = build_model("effnet_lite0_dlv3p", num_classes=4, pretrained=False).train()
    x = torch.rand(2, 3, 64, 64)
    logits, feats = m(x)
    y = torch.randint(0, 4, (2, 64, 64))
    loss = F.cross_entropy(F.interpolate(logits, size=(64, 64), mode="bilinear",
                                         align_corners=False), y)
    v = feats.permute(0, 2, 3, 1).reshape(-1, 256)
    p = m.prediction(m.projection(v))
    lab = torch.randint(0, 4, (v.shape[0],))
    loss = loss + m.attention_pred(p, lab).mean()
    loss.backward()
    assert m.backbone._conv_stem.weight.grad is not None
    assert m.attention_pred.weight1.grad[int(lab[0])].abs().sum() > 0


def test_unknown_arch():
    with pytest.raises(ValueError) as ei:
        build_model("unet", 3)
    for a in ARCH_NAMES:
        assert a in str(ei.value)


def test_resnet_offline_error_message(monkeypatch):
    def fail(weights):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(deeplab_mod, "_download_state_dict", fail)
    with pytest.raises(RuntimeError) as ei:
        build_model("deeplabv2_r101", 3, pretrained=True)
    msg = str(ei.value)
    assert "\n" not in msg
    assert "ResNet101_Weights.IMAGENET1K_V1" in msg
    assert "TORCH_HOME" in msg and "internet" in msg
    assert "pretrained=False" in msg and "model.pretrained=false" in msg
    with pytest.raises(RuntimeError, match="ResNet50_Weights"):
        build_model("deeplabv3p_r50", 3, pretrained=True)


# --------------------------------------------------------------------------- heads
def test_mlp_head():
    h = MLPHead(64)
    assert isinstance(h.net[1], torch.nn.BatchNorm1d) and isinstance(h.net[2], torch.nn.ReLU)
    assert h(torch.randn(10, 64)).shape == (10, 256)
    assert h(torch.randn(1, 64)).shape == (1, 256)  # single vector in train mode


def _loop_reference(loop, vecs, labels):
    out = []
    for i in range(vecs.shape[0]):
        mod = loop[int(labels[i])]
        out.append(mod(vecs[i:i + 1]))
    return torch.cat(out)


def _manual_attention(loop, vecs, labels, batch_stats):
    """S_c by hand: Linear -> BatchNorm1d -> LeakyReLU(0.01) -> Linear(1) -> Sigmoid, with the weights of
    module ``modules_per_class[c]`` of the per-class reference for a vector of class c. ``batch_stats``:
    BatchNorm with the (biased) statistics of the class's vectors (train mode), else with the running
    statistics; a class with a single vector always uses the running statistics."""
    out = torch.full((vecs.shape[0],), float("nan"))
    for c in labels.unique().tolist():
        mod = loop.modules_per_class[c]
        idx = (labels == c).nonzero().flatten()
        h = vecs[idx] @ mod.fc1.weight.T + mod.fc1.bias
        if batch_stats and len(idx) > 1:
            mean, var = h.mean(0), h.var(0, unbiased=False)
        else:
            mean, var = mod.bn.running_mean, mod.bn.running_var
        h = (h - mean) / torch.sqrt(var + mod.bn.eps) * mod.bn.weight + mod.bn.bias
        h = torch.where(h > 0, h, 0.01 * h)
        out[idx] = 1 / (1 + torch.exp(-(h @ mod.fc2.weight.T + mod.fc2.bias)[:, 0]))
    return out


def test_class_attention_matches_per_vector_loop_eval():
    torch.manual_seed(0)
    att, loop = randomised_attention(4, dim=16, hidden=8)
    att.eval(), loop.eval()
    vecs = torch.randn(30, 16)
    labels = torch.tensor([3, 0, 0, 2, 3, 3] * 5)
    with torch.no_grad():
        out = att(vecs, labels)
        ref = _loop_reference(loop, vecs, labels)
        manual = _manual_attention(loop, vecs, labels, batch_stats=False)
    assert torch.allclose(out, ref, atol=1e-6)
    assert torch.allclose(out, manual, atol=1e-6), "S_c differs from Linear-BN-LeakyReLU-Linear-Sigmoid by hand"
    assert out.std() > 0.05  # the scores spread: the comparison above is not between constants
    with torch.no_grad():
        # the same vectors through each class's module: four different S_c
        per_class = torch.stack([att(vecs, torch.full((30,), c)) for c in range(4)])
        for c in range(4):
            assert torch.allclose(per_class[c], _manual_attention(loop, vecs, torch.full((30,), c), False), atol=1e-6)
        for a in range(4):
            for b in range(a + 1, 4):
                assert (per_class[a] - per_class[b]).abs().max() > 1e-2, (a, b)
        # a vector's score depends on its own class's weights only
        att.weight1[0].add_(0.5)
        after = att(vecs, labels)
    assert torch.equal(after[labels != 0], out[labels != 0])
    assert (after[labels == 0] - out[labels == 0]).abs().min() > 0


def test_class_attention_train_mode_per_class_batches():
    torch.manual_seed(0)
    att, loop = randomised_attention(3, dim=8, hidden=8)
    att.train()
    vecs = torch.randn(12, 8)
    labels = torch.tensor([2, 0, 2, 2, 0, 1, 0, 2, 0, 0, 2, 2])  # class 1: single vector
    manual = _manual_attention(loop, vecs, labels, batch_stats=True)  # before the running stats move
    out = att(vecs, labels)
    assert out.shape == (12,)
    # BatchNorm with each class's own batch statistics; the lone class-1 vector with the running ones
    assert torch.allclose(out.detach(), manual, atol=1e-6), "train-mode S_c differs from the manual per-class computation"
    # reference: each class's module applied to that class's vectors as a batch
    ref = torch.empty(12)
    for c in range(3):
        idx = (labels == c).nonzero().flatten()
        mod = copy.deepcopy(loop[c]).train()
        if len(idx) == 1:
            mod.eval()
        ref[idx] = mod(vecs[idx]).detach()
    assert torch.allclose(out.detach(), ref, atol=1e-6)
    # the statistics are per class: other classes' vectors do not change a class's scores
    moved = vecs.clone()
    moved[labels == 2] = torch.randn(int((labels == 2).sum()), 8)
    again = att(moved, labels).detach()
    assert torch.allclose(again[labels != 2], out.detach()[labels != 2], atol=1e-6)
    assert not torch.allclose(again[labels == 2], out.detach()[labels == 2], atol=1e-3)
    # gradients flow to the vectors and to the weights of the classes present only
    vecs.requires_grad_(True)
    att(vecs, labels).sum().backward()
    assert vecs.grad is not None and vecs.grad.abs().sum() > 0
    for c in range(3):
        assert att.weight1.grad[c].abs().sum() > 0
    att.zero_grad(set_to_none=True)
    att(vecs[labels == 0], labels[labels == 0]).sum().backward()
    assert att.weight1.grad[1].abs().sum() == 0 and att.weight1.grad[0].abs().sum() > 0


def test_class_attention_single_vector_and_empty():
    torch.manual_seed(0)
    att, loop = randomised_attention(5, dim=8, hidden=256)
    att.train()
    v = torch.randn(1, 8)
    running = att.running_mean[4].clone()
    s = att(v, torch.tensor([4]))
    # one vector in train mode: BatchNorm with the running statistics, which it leaves unchanged
    assert s.shape == (1,)
    assert torch.allclose(s.detach(), _manual_attention(loop, v, torch.tensor([4]), batch_stats=True), atol=1e-6), \
        "a lone vector's S_c differs from the manual computation with running statistics"
    assert torch.equal(att.running_mean[4], running)
    assert not torch.allclose(s.detach(), att(v, torch.tensor([3])).detach(), atol=1e-3)  # module 3, not 4
    e = att(torch.randn(0, 8), torch.zeros(0, dtype=torch.long))
    assert e.shape == (0,)
    with pytest.raises(RuntimeError, match="labels must be in"):
        att(torch.randn(2, 8), torch.tensor([0, 5]))
