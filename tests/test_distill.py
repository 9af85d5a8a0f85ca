"""Distillation stage parts: the teacher-output cache pairs each output with its own view only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data.config import AugmentConfig
from data.loader import InspectionDataset, make_loader
from data.manifest import Sample
from data.transforms import ModelView
from distill.config import DistillConfig
from distill.steps import StudentTrainee, distill_step, make_projector
from distill.teacher_cache import TeacherCache, build_teacher_cache
from training.modeling import Classifier
from training.networks import create_network

CPU = torch.device("cpu")


def _teacher() -> Classifier:
    torch.manual_seed(0)
    kwargs = {"patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}
    net = create_network("vit_tiny_patch16_224", img_size=32, model_kwargs=kwargs)
    return Classifier(net, ModelView(32, (0.5,) * 3, (0.5,) * 3), "vit_tiny_patch16_224", kwargs).eval()


def _student() -> Classifier:
    torch.manual_seed(0)
    return Classifier(create_network("mobilenetv3_small_100"), ModelView(24, (0.4,) * 3, (0.2,) * 3),
                      "mobilenetv3_small_100")


def _train_loader(views: int | None):
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(10)]
    ds = InspectionDataset([Sample(f"m{i}", i % 2, str(i), "train") for i in range(10)], 32,
                           augment_cfg=AugmentConfig(), pixels=pixels)
    return make_loader(ds, 4, train=True, seed=7, views=views, num_workers=0)


def test_cached_outputs_equal_live_teacher_on_the_same_views() -> None:
    teacher = _teacher()
    loader = _train_loader(views=3)
    cache = build_teacher_cache(teacher, loader.dataset, loader.sampler, device=CPU, batch_size=4)
    assert cache.logits.shape == (10, 3, 2)
    checked = 0
    for epoch in range(4):
        loader.sampler.set_epoch(epoch)
        for images, _, index, views in loader:
            with torch.no_grad():
                live = teacher(images)
            torch.testing.assert_close(cache.lookup(index, views), live, rtol=1e-5, atol=1e-6)
            checked += len(index)
    assert checked == 4 * 8  # drop_last: 2 full batches of 4 per epoch


def test_cache_holds_the_teacher_on_its_own_view_and_training_batches_then_drop_that_view(tmp_path) -> None:
    """With a teacher at another size the cache is built on the teacher's own views (as the live
    step would score them); the cached student's training items then carry no teacher view, which
    no step reads and which costs as much to make as the student's view."""
    from data.prepare import prepare_data
    from distill.config import load_config
    from distill.stages import Context, student_run_parts

    teacher = _teacher()  # 32 px; the student 24 px
    rng = np.random.default_rng(1)
    pixels = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(10)]
    ds = InspectionDataset([Sample(f"m{i}", i % 2, str(i), "train") for i in range(10)], 24,
                           augment_cfg=AugmentConfig(), pixels=[p[4:28, 4:28] for p in pixels], teacher_size=32,
                           teacher_pixels=pixels)
    loader = make_loader(ds, 4, train=True, seed=7, views=2, num_workers=0)
    cache = build_teacher_cache(teacher, ds, loader.sampler, device=CPU, batch_size=4)
    for *_, index, views, teacher_images in loader:
        with torch.no_grad():
            torch.testing.assert_close(cache.lookup(index, views), teacher(teacher_images), rtol=1e-5, atol=1e-6)
    ds.teacher_view = False
    assert len(ds[(0, 5)]) == 4 and ds.view(0, 5, 32).shape[-1] == 32

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("data:\n  source: synthetic\n  synthetic: {image_size: 32, num_train: 16, num_val: 8, "
                        "num_test: 8, defect_ratio: 0.25}\n", encoding="utf-8")
    data = prepare_data(load_config(cfg_file, []).data, tmp_path / "run" / "data", 0)
    for outputs, carried in (("cached", 4), ("live", 5)):
        cfg = load_config(cfg_file, [f"distill.teacher_outputs={outputs}"])
        ctx = Context(cfg, tmp_path / "run", data, CPU, log=lambda _: None)
        train, *_ = student_run_parts(ctx, _student(), teacher, tmp_path / "run" / "student")
        assert train.dataset.teacher_size == 32 and len(next(iter(train))) == carried


def test_cache_refuses_a_view_it_never_saw() -> None:
    loader = _train_loader(views=2)
    cache = build_teacher_cache(_teacher(), loader.dataset, loader.sampler, device=CPU, batch_size=4)
    images, _, index, views = next(iter(loader))
    with pytest.raises(RuntimeError, match="never cached"):
        cache.lookup(index, views + 1)
    live_loader = _train_loader(views=None)  # fresh views every epoch: not in the cache
    _, _, index, views = next(iter(live_loader))
    with pytest.raises(RuntimeError, match="may only pair with the view"):
        cache.lookup(index, views)


def test_cache_save_load(tmp_path) -> None:
    cache = TeacherCache(torch.arange(6).view(3, 2), torch.randn(3, 2, 2))
    cache.save(tmp_path / "c.safetensors", {"views": 2})
    again, meta = TeacherCache.load(tmp_path / "c.safetensors")
    assert meta == {"views": 2} and torch.equal(again.logits, cache.logits)
    assert torch.equal(again.lookup(torch.tensor([2, 0]), torch.tensor([5, 0])), cache.logits[[2, 0], [1, 0]])


@pytest.mark.parametrize("loss", ["kd", "hard", "feature"])
def test_distill_step_trains_only_the_student(loss: str) -> None:
    teacher, student = _teacher(), _student()
    cfg = DistillConfig(loss=loss, mixup=0.4 if loss == "kd" else 0.0)
    trainee = StudentTrainee(student, make_projector(student, teacher) if loss == "feature" else None)
    step = distill_step(teacher, cfg, generator=torch.Generator().manual_seed(0))
    batch = next(iter(_train_loader(views=None)))
    out = step(trainee, batch)
    assert set(out) >= {"loss", "ce"} and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    if loss == "feature":
        assert "feature" in out and trainee.projector.proj.weight.grad is not None


def test_function_matching_gives_the_teacher_the_same_mixed_batch_in_eval_mode() -> None:
    """With mixup, the teacher must score exactly the mixed images the student sees (function
    matching), in eval mode (no dropout, no BatchNorm updates) even while the student trains."""
    from distill.losses import mixup

    teacher, student = _teacher(), _student()
    seen: list[tuple[torch.Tensor, bool]] = []
    teacher.register_forward_hook(lambda module, args, out: seen.append((args[0].clone(), module.training)))
    student_inputs: list[torch.Tensor] = []
    student.register_forward_hook(lambda module, args, out: student_inputs.append(args[0].clone()))
    step = distill_step(teacher, DistillConfig(loss="kd", mixup=0.4), generator=torch.Generator().manual_seed(3))
    trainee = StudentTrainee(student).train()  # what the fit loop does before every epoch
    images, labels, index, views = next(iter(_train_loader(views=None)))
    step(trainee, (images, labels, index, views))
    expected, _, lam, _ = mixup(images, labels, 0.4, torch.Generator().manual_seed(3))
    assert 0.0 < lam < 1.0 and not torch.equal(expected, images)  # a real mix, not the plain batch
    (teacher_input, teacher_training), = seen
    assert not teacher_training
    torch.testing.assert_close(teacher_input, expected, rtol=0, atol=0)
    torch.testing.assert_close(student_inputs[0], expected, rtol=0, atol=0)


def test_baseline_step_mixes_as_the_distilled_step_does() -> None:
    """The baseline keeps the distilled student's mixup (so the two differ by the teacher alone):
    same generator seed, same mixed images, and cross-entropy on the mixed labels."""
    from distill.losses import cross_entropy, mixup
    from distill.steps import ce_step

    student = _student()
    inputs: list[torch.Tensor] = []
    student.register_forward_hook(lambda module, args, out: inputs.append(args[0].clone()))
    images, labels, index, views = next(iter(_train_loader(views=None)))
    out = ce_step(mixup_alpha=0.4, generator=torch.Generator().manual_seed(3))(StudentTrainee(student).train(),
                                                                               (images, labels, index, views))
    expected, soft, lam, _ = mixup(images, labels, 0.4, torch.Generator().manual_seed(3))
    assert 0.0 < lam < 1.0
    torch.testing.assert_close(inputs[0], expected, rtol=0, atol=0)
    torch.testing.assert_close(out["loss"], cross_entropy(student(expected), soft))
    ce_step()(StudentTrainee(student), (images, labels, index, views))
    torch.testing.assert_close(inputs[-1], images, rtol=0, atol=0)  # alpha 0: the plain batch


def test_cached_step_uses_the_cache_not_the_teacher() -> None:
    teacher = _teacher()
    loader = _train_loader(views=2)
    cache = build_teacher_cache(teacher, loader.dataset, loader.sampler, device=CPU, batch_size=4)
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    step = distill_step(teacher, DistillConfig(teacher_outputs="cached"), cache=cache)
    out = step(StudentTrainee(_student()), next(iter(loader)))
    assert torch.isfinite(out["loss"]) and not calls


def test_stage_parts_read_their_own_batch_size_and_the_unlabeled_images(tmp_path) -> None:
    """The prune stage trains with prune.batch_size (not the student's). A distilled student learns
    from the labeled training images and every unlabeled one (held back by data.label_fraction, or
    the pool), with the teacher's own view; on its own (the baseline), from the labeled ones only."""
    from data.prepare import prepare_data
    from distill.config import load_config
    from distill.stages import Context, student_run_parts

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("data:\n  source: synthetic\n  synthetic: {image_size: 32, num_train: 40, num_val: 10, "
                        "num_test: 10, defect_ratio: 0.25, num_unlabeled: 8}\n", encoding="utf-8")
    cfg = load_config(cfg_file, ["student.batch_size=16", "prune.batch_size=4", "data.label_fraction=0.5"])
    data = prepare_data(cfg.data, tmp_path / "run" / "data", 0)
    ctx = Context(cfg, tmp_path / "run", data, CPU, log=lambda _: None)
    student, teacher = _student(), _teacher()
    alone, *_, what = student_run_parts(ctx, student, None, tmp_path / "run" / "student_baseline")
    assert len(alone.dataset) == 20 and int((alone.dataset.labels >= 0).sum()) == 20
    assert len(alone.sampler) == 48 and "48 draws an epoch" in what  # as many updates as the distilled student
    assert int(alone.dataset.labels.sum()) == 5 and "on 20 labeled training images" in what  # half of 10 defects
    distilled, *_, what = student_run_parts(ctx, student, teacher, tmp_path / "run" / "student")
    pruned, *_ = student_run_parts(ctx, student, teacher, tmp_path / "run" / "p", cfg.prune)
    assert (distilled.batch_size, pruned.batch_size) == (16, 4)
    assert len(distilled.dataset) == 48 and int((distilled.dataset.labels < 0).sum()) == 28
    assert "on 20 labeled and 28 unlabeled training images" in what
    image, label, index, view, teacher_view = distilled.dataset[(30, 7)]
    assert label == -1 and image.shape[-1] == student.img_size and teacher_view.shape[-1] == teacher.img_size


def test_the_teacher_sees_its_own_view_of_each_image(tmp_path) -> None:
    """During distillation the teacher scores the very pixels its own training and evaluation
    loaders give for that (image, view): rendered at its resolution from the source and augmented
    with the same seed; not the student's view resampled."""
    from data.config import DataConfig, SyntheticConfig
    from data.prepare import prepare_data

    for variants in (None, 2):  # a new bead per view, or a few kept
        syn = SyntheticConfig(image_size=32, num_train=8, num_val=4, num_test=4, variants=variants)
        data = prepare_data(DataConfig(source="synthetic", synthetic=syn), tmp_path / f"v{variants}", seed=1)
        teacher_own = data.dataset("train", 32, train=True)
        distilled = data.dataset("train", 48, train=True, teacher_size=32)
        plain_teacher, plain_both = data.dataset("val", 32), data.dataset("val", 48, teacher_size=32)
        for key in ((0, 11), (5, 12345), (7, 3)):
            student_view, *_, teacher_view = distilled[key]
            assert student_view.shape[-1] == 48 and torch.equal(teacher_view, teacher_own[key][0])
            resampled = torch.nn.functional.interpolate(student_view[None], size=(32, 32), mode="bilinear",
                                                        antialias=True)[0]
            assert not torch.allclose(resampled, teacher_view, atol=1e-3)  # what the teacher used to get
        assert torch.equal(plain_both[2][4], plain_teacher[2][0])
