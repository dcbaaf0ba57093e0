"""The segmentation model: heads and shapes, loading classification and segmentation checkpoints, slide
inference, the loss, SyncBatchNorm conversion."""
import pytest
import torch
import torch.nn.functional as F

from dyvm.checkpoint import CheckpointError
from dyvm.models.dyvm import DyVM, make_dyvm_config
from dyvm.models.vim import Vim, VimConfig
from dyvm.seg.checkpoint import drop_class_entry, load_seg_checkpoint, resize_grid
from dyvm.seg.losses import SegLoss
from dyvm.seg.segmentor import build_segmentor, slide_inference, to_sync_batchnorm, window_starts

TINY = dict(patch_size=4, depth=4, embed_dim=32, d_state=8, decode_channels=16, aux_channels=8)


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    return build_segmentor("vim_tiny", num_classes=5, img_size=32, **TINY)


def test_shapes_and_auxiliary_head_only_in_training(dense):
    x = torch.randn(2, 3, 32, 32)
    dense.train()
    out = dense(x)
    assert out.logits.shape == out.aux_logits.shape == (2, 5, 32, 32)
    dense.eval()
    with torch.no_grad():
        out = dense(x)
    assert out.aux_logits is None and len(out.backbone.features) == 4
    assert [tuple(f.shape) for f in dense.neck(out.backbone.features)] == [(2, 32, 32, 32), (2, 32, 16, 16),
                                                                            (2, 32, 8, 8), (2, 32, 4, 4)]


def test_loss_terms_and_their_weights():
    torch.manual_seed(0)
    model = build_segmentor("dyvm_vim_tiny", num_classes=5, img_size=32, token_keep_ratio=0.7, **TINY).train()
    out = model(torch.randn(2, 3, 32, 32))
    masks = torch.randint(0, 5, (2, 32, 32))
    masks[0, :4] = 255
    loss_fn = SegLoss.from_model(model, token_weight=20.0, block_weight=20.0, aux_weight=0.4)
    loss, parts = loss_fn(out, masks)
    torch.testing.assert_close(parts["decode_loss"], F.cross_entropy(out.logits, masks, ignore_index=255).detach())
    aux = F.cross_entropy(out.aux_logits, masks, ignore_index=255).detach()
    torch.testing.assert_close(parts["aux_loss"], 0.4 * aux)
    gates, decisions = out.backbone.gates, out.backbone.decisions
    torch.testing.assert_close(parts["block_pruning_loss"], 20 * (gates.detach().mean() - 0.8) ** 2)
    token = sum((d.detach().mean(1) - r) ** 2 for d, r in zip(decisions, (0.7, 0.49, 0.343)))
    torch.testing.assert_close(parts["token_pruning_loss"], 20 * token.mean() / 3)
    torch.testing.assert_close(loss.detach(), sum(parts.values()))


def _classifier(cls, **dyvm):
    cfg = VimConfig(img_size=16, patch_size=4, depth=4, embed_dim=32, d_state=8, num_classes=7)  # 4x4 grid
    model = cls(cfg, make_dyvm_config(pruning_loc=(1, 2, 3), **dyvm)) if cls is DyVM else cls(cfg)
    with torch.no_grad():  # a recognisable position embedding: entry i holds i in every channel
        model.pos_embed.copy_(torch.arange(17.0).view(1, 17, 1).expand(1, 17, 32))
    return model


@pytest.mark.parametrize("classifier", [Vim, DyVM])
def test_loading_a_classification_checkpoint(classifier, tmp_path):
    source = _classifier(classifier)
    path = tmp_path / "cls.pth"
    torch.save({"model": source.state_dict()}, path)
    model = build_segmentor("dyvm_vim_tiny", num_classes=5, img_size=16, token_keep_ratio=0.7, **TINY)
    fresh_predictor = {k: v.clone() for k, v in model.backbone.score_predictors.state_dict().items()}
    summary = load_seg_checkpoint(model, str(path))
    # the class entry is index M//2 = 8: the patches are entries 0..7 and 9..16, nothing else
    expected = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16.0])
    torch.testing.assert_close(model.backbone.pos_embed[0, :, 0], expected)
    assert "index 8" in summary and "classifier-only" in summary
    torch.testing.assert_close(model.backbone.layers[2].mixer.in_proj.weight, source.layers[2].mixer.in_proj.weight)
    torch.testing.assert_close(model.backbone.patch_embed.proj.weight, source.patch_embed.proj.weight)
    for layer in model.backbone.layers:  # gates open, whatever the file held
        assert layer.mixer.block_head.weight.eq(0).all() and layer.mixer.block_head.bias.eq(5).all()
    for k, v in model.backbone.score_predictors.state_dict().items():  # predictors untouched (fresh)
        assert torch.equal(v, fresh_predictor[k]), k


def test_position_embedding_is_resized_without_the_class_entry(tmp_path):
    source = _classifier(Vim)
    torch.save({"model": source.state_dict()}, tmp_path / "cls.pth")
    model = build_segmentor("vim_tiny", num_classes=5, img_size=32, **TINY)  # 8x8 grid
    summary = load_seg_checkpoint(model, str(tmp_path / "cls.pth"))
    patches = drop_class_entry(source.pos_embed.detach())
    grid = patches.reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    torch.testing.assert_close(model.backbone.pos_embed.detach(), expected.reshape(1, 64, 32))
    assert "4x4 to a 8x8 grid" in summary
    torch.testing.assert_close(resize_grid(patches, 4), patches)


def test_dense_segmentation_checkpoint_into_a_dyvm_segmenter(dense, tmp_path):
    torch.save({"model": dense.state_dict()}, tmp_path / "seg.pth")
    model = build_segmentor("dyvm_vim_tiny", num_classes=5, img_size=32, token_keep_ratio=0.7, **TINY)
    summary = load_seg_checkpoint(model, str(tmp_path / "seg.pth"))
    assert "gate heads initialised open" in summary and "predictors freshly initialised" in summary
    own = model.state_dict()
    for k, v in dense.state_dict().items():
        assert torch.equal(own[k], v), k
    wrong = build_segmentor("vim_tiny", num_classes=6, img_size=32, **TINY)
    with pytest.raises(CheckpointError, match="decode_head.classifier"):
        load_seg_checkpoint(wrong, str(tmp_path / "seg.pth"))


def test_slide_inference(dense):
    dense.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(slide_inference(dense, x, 32, 21), dense(x).logits)
        big = torch.randn(2, 3, 40, 70)
        logits = slide_inference(dense, big, 32, 21)
        assert logits.shape == (2, 5, 40, 70)
        # the bottom-right corner is covered by the last window only: its logits are that window's
        last = window_starts(70, 32, 21)[-1]
        torch.testing.assert_close(logits[..., 32:, -5:], dense(big[:, :, 8:40, last:last + 32]).logits[..., 24:, -5:])
        # a pixel under two windows gets their mean
        a, b = dense(big[:, :, 0:32, 0:32]).logits, dense(big[:, :, 8:40, 0:32]).logits
        torch.testing.assert_close(logits[..., 10, 3], (a[..., 10, 3] + b[..., 2, 3]) / 2)
        small = slide_inference(dense, torch.randn(1, 3, 20, 24), 32, 21)  # padded window
        assert small.shape == (1, 5, 20, 24)
    assert window_starts(683, 512, 341) == [0, 171] and window_starts(2048, 512, 341)[-1] == 1536


def test_sync_batchnorm_only_on_cuda(dense):
    assert to_sync_batchnorm(dense, torch.device("cpu")) is dense
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(build_segmentor("vim_tiny", num_classes=5, img_size=32,
                                                                              **TINY))
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in converted.modules())


def test_model_option_errors():
    with pytest.raises(ValueError, match="dense Vim"):
        build_segmentor("vim_tiny", num_classes=5, img_size=32, token_keep_ratio=0.7, **TINY)
    with pytest.raises(ValueError, match="unknown model"):
        build_segmentor("resnet50", num_classes=5)
