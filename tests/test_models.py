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


@pytest.mark.parametrize("arch", ARCH_NAMES)
@pytest.mark.parametrize("hw", [(64, 64), (57, 70)])
def test_shapes_and_classify(models, arch, hw):
    m = models[arch].eval()
    H, W = hw
    x = torch.rand(2, 3, H, W)
    with torch.no_grad():
        logits, feats = m(x)
        again = m.classify(feats)
    h, w = math.ceil(H / 8), math.ceil(W / 8)
    assert logits.shape == (2, 5, h, w)
    assert feats.shape == (2, m.feat_dim, h, w)
    assert m.output_stride == 8 and m.num_classes == 5
    assert torch.allclose(again, logits, atol=1e-5)
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
    m = models["effnet_lite0_dlv3p"]
    t = copy.deepcopy(m)
    names = {n for n, _ in t.named_parameters()}
    assert any(n.startswith("attention_proj.") for n in names)
    assert any(n.startswith("projection.") for n in names)


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
    assert m.attention_pred[int(lab[0])].fc1.weight.grad is not None


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


def _loop_reference(att, vecs, labels):
    out = []
    for i in range(vecs.shape[0]):
        mod = att[int(labels[i])]
        out.append(mod(vecs[i:i + 1]))
    return torch.cat(out)


def test_class_attention_matches_per_vector_loop_eval():
    torch.manual_seed(0)
    att = ClassAttention(4, dim=16, hidden=8)
    for mod in att.modules_per_class:  # non-trivial running stats
        mod.bn.running_mean.uniform_(-1, 1)
        mod.bn.running_var.uniform_(0.5, 2)
    att.eval()
    vecs = torch.randn(30, 16)
    labels = torch.tensor([3, 0, 0, 2, 3, 3] * 5)
    with torch.no_grad():
        out = att(vecs, labels)
        ref = _loop_reference(att, vecs, labels)
    assert torch.allclose(out, ref, atol=1e-6)
    assert ((out >= 0) & (out <= 1)).all()


def test_class_attention_train_mode_per_class_batches():
    torch.manual_seed(0)
    att = ClassAttention(3, dim=8, hidden=8).train()
    vecs = torch.randn(12, 8)
    labels = torch.tensor([2, 0, 2, 2, 0, 1, 0, 2, 0, 0, 2, 2])  # class 1: single vector
    out = att(vecs, labels)
    assert out.shape == (12,)
    assert ((out >= 0) & (out <= 1)).all()
    # reference: each class's module applied to that class's vectors as a batch
    ref = torch.empty(12)
    att2 = copy.deepcopy(att)  # fresh running stats would differ; compare outputs only
    for c in range(3):
        idx = (labels == c).nonzero().flatten()
        mod = att2[c]
        if len(idx) == 1:
            mod.eval()
        ref[idx] = mod(vecs[idx]).detach()
    assert torch.allclose(out.detach(), ref, atol=1e-6)
    # gradients flow to the vectors and to the used modules only
    vecs.requires_grad_(True)
    att(vecs, labels).sum().backward()
    assert vecs.grad is not None and vecs.grad.abs().sum() > 0
    for c in range(3):
        assert att[c].fc1.weight.grad is not None
    att.zero_grad(set_to_none=True)
    att(vecs[labels == 0], labels[labels == 0]).sum().backward()
    assert att[1].fc1.weight.grad is None and att[0].fc1.weight.grad is not None


def test_class_attention_single_vector_and_empty():
    att = ClassAttention(5, dim=8).train()
    s = att(torch.randn(1, 8), torch.tensor([4]))
    assert s.shape == (1,) and 0 <= s.item() <= 1
    e = att(torch.randn(0, 8), torch.zeros(0, dtype=torch.long))
    assert e.shape == (0,)
    with pytest.raises(ValueError):
        att(torch.randn(2, 8), torch.tensor([0, 5]))
