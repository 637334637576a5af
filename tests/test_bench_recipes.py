"""The bench's recipe section builds each case on its own model: a stem's training case must not leave its
inference cases in training mode or move their weights."""

from __future__ import annotations

import torch

from vitbn.bench.recipes import RecipeOptions, recipe_cases

TINY = (("dim", 16), ("depth", 1), ("heads", 2), ("dim_head", 8), ("mlp_dim", 32))


def test_stem_inference_cases_stay_in_eval_mode_while_the_training_case_steps():
    options = RecipeOptions(models=("vitbn",), layouts=("sequential 6x1",), batches=(2,), precisions=("fp32",),
                            stem_batch=6, train_batch=4, overrides=TINY)  # fmt: skip
    cases, rows, stems = recipe_cases(options, torch.device("cpu"))
    assert [(r["what"], r["variant"], r["mode"]) for r in rows] == [
        ("blocks", "sequential 6x1", "infer"),
        *[("stem", f"{s} (patch 4)", m) for s in ("linear", "hmlp") for m in ("infer", "train")],
    ]
    assert set(stems) == {"vitbn linear", "vitbn hmlp"}
    for stem in ("linear", "hmlp"):
        infer = cases[("stem", "vitbn", stem, "fp32", "infer", 6)]
        train = cases[("stem", "vitbn", stem, "fp32", "train", 4)]
        before = infer.run().clone()
        for _ in range(2):
            train.run()  # Adam steps on the training case's model
        # Eval-mode BatchNorm on unchanged weights: the same logits, bit for bit. Before, the training case shared
        # the model: BN ran on batch statistics and the weights had moved.
        assert torch.equal(infer.run(), before)
