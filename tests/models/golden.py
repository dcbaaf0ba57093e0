"""What the golden tests share: where the authors' golden files are, loading one, the relative error they use,
and the authors' per-stage decisions mapped to original patch order (tests/golden/README.md)."""
import os

import pytest
import torch

from dyvm.pruning import kept_first_order, to_original_order

GOLDEN_DIR = os.environ.get("DYVM_GOLDEN_DIR",
                            os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "golden"))


def load_golden(name: str) -> dict:
    """A golden file of tests/golden (or of $DYVM_GOLDEN_DIR) by file name."""
    path = os.path.join(GOLDEN_DIR, name)
    if not os.path.isfile(path):
        pytest.fail(f"golden file {path} not found: set DYVM_GOLDEN_DIR to the folder holding it")
    return torch.load(path, map_location="cpu")


def rel(a, b) -> float:
    """Max-norm relative error of a against b."""
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def decisions_in_original_order(golden_decisions):
    """The authors store each stage's decision in the slot order it was made in (the previous stage's
    arrangement); replay the rearrangement to map them to original patch order, and return the slot map."""
    batch, m = golden_decisions[0].shape
    slot_to_patch = torch.arange(m).expand(batch, m)
    original = []
    for decision in golden_decisions:
        original.append(to_original_order(decision, slot_to_patch, m))
        slot_to_patch = slot_to_patch.gather(1, kept_first_order(decision))
    return original, slot_to_patch


def assert_training_output_matches(out, golden: dict) -> None:
    """A training-mode ForwardOutput against the authors' (the train_* entries of a golden file): logits and
    final patch tokens to 1e-4, every stage's decision (in original patch order), the slot map, the final policy
    and the gates exactly."""
    assert rel(out.logits, golden["train_logits"]) < 1e-4
    decisions, slot_to_patch = decisions_in_original_order(golden["train_decisions"])
    for ours, theirs in zip(out.decisions, decisions, strict=True):
        assert torch.equal(ours.detach(), theirs)
    assert torch.equal(slot_to_patch, golden["train_slot_to_patch"])
    assert torch.equal(out.slot_to_patch, golden["train_slot_to_patch"])
    assert torch.equal(out.final_policy, golden["train_final_policy"])
    assert torch.equal(out.gates.detach(), golden["train_block_policy"][:, :, 0])
    assert rel(out.patch_tokens, golden["train_patch_tokens"]) < 1e-4
