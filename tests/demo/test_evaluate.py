"""The demo's evaluation and its teacher table: a cached or shipped table gives exactly the figures a fresh
computation gives, and is used only for the teacher file and settings it was computed with."""
import pytest
import torch
from checks import trained_like_

from freeflow import demo
from freeflow.config import parse_args
from freeflow.demo import evaluate, teacher
from freeflow.distill import TeacherAdapter
from freeflow.models import DiT, DiTConfig, FlowMapStudent, load_checkpoint, save_checkpoint


@pytest.fixture(autouse=True)
def _one_thread_and_a_private_cache(monkeypatch, tmp_path):
    """One thread (the shipped table was built on one; the reduction order is then the same) and a user cache
    of the test's own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_teacher(path, seed=0):
    torch.manual_seed(seed)
    model = DiT(DiTConfig(**dict(teacher.TEACHER_ARCH, patch_size=7, hidden_size=32, depth=1, num_heads=2)),
                family="internal", backend="reference")
    trained_like_(model)
    save_checkpoint(model, str(path))
    return load_checkpoint(str(path), backend="reference").eval()


def _evaluate(student, model, **kw):
    return evaluate.evaluate_student(student, TeacherAdapter(model, 10), samples=40, gw=1.5, teacher_steps=4,
                                     seed=3, device=torch.device("cpu"), batch=16, **kw)


def test_cached_teacher_table_gives_the_fresh_figures_and_only_for_its_teacher_and_settings(tmp_path):
    model = _tiny_teacher(tmp_path / "t.pt")
    student = FlowMapStudent.from_teacher(model).eval()
    trained_like_(student)
    fresh = _evaluate(student, model)  # no teacher file: everything computed, nothing cached
    assert fresh["teacher_table"] == "computed" and not (tmp_path / "cache").exists()
    first = _evaluate(student, model, teacher_path=str(tmp_path / "t.pt"))
    second = _evaluate(student, model, teacher_path=str(tmp_path / "t.pt"))
    assert (first["teacher_table"], second["teacher_table"]) == ("computed", "cache")
    figures = [k for k in fresh if k.startswith(("fd_", "student_to_"))]
    assert len(figures) == 6  # student, Heun 1/2/4 (4 = teacher_steps), and the two endpoint distances
    for k in figures:
        assert first[k] == fresh[k] and second[k] == fresh[k], k
    # Another γ, or another teacher file under the same name, is another table.
    other_gw = evaluate.evaluate_student(student, TeacherAdapter(model, 10), samples=40, gw=2.0, teacher_steps=4,
                                         seed=3, device=torch.device("cpu"), batch=16,
                                         teacher_path=str(tmp_path / "t.pt"))
    assert other_gw["teacher_table"] == "computed"
    retrained = _tiny_teacher(tmp_path / "t.pt", seed=1)
    again = _evaluate(student, retrained, teacher_path=str(tmp_path / "t.pt"))
    assert again["teacher_table"] == "computed" and again["fd_teacher_heun4"] != fresh["fd_teacher_heun4"]


def test_a_torn_cache_file_is_a_miss_not_an_error(tmp_path):
    model = _tiny_teacher(tmp_path / "t.pt")
    student = FlowMapStudent.from_teacher(model).eval()
    first = _evaluate(student, model, teacher_path=str(tmp_path / "t.pt"))
    [cached] = (tmp_path / "cache" / "freeflow").iterdir()
    cached.write_bytes(cached.read_bytes()[:100])
    again = _evaluate(student, model, teacher_path=str(tmp_path / "t.pt"))
    assert again["teacher_table"] == "computed" and again["fd_teacher_heun4"] == first["fd_teacher_heun4"]


@pytest.mark.slow
def test_shipped_teacher_table_is_the_demo_s_and_equals_a_fresh_computation():
    """The table shipped with the assets is found for the mnist preset's own evaluation (so the demo samples only
    its student), and its figures are what the teacher gives when sampled afresh: its Heun 1/2 FDs over all
    1,500 samples (Heun 4 would cost as much as the rest of the test; the same loop builds it), its FD 32 from
    its endpoints, and 64 endpoints re-sampled with 32 Heun steps from the noises and classes the evaluation
    draws (written out here: per batch of 500, the noises, then the classes)."""
    cfg, _ = parse_args([])
    path = demo.ASSETS_DIR / demo.DEMO_TEACHER_FILE
    model = load_checkpoint(str(path), backend="reference").eval()
    adapter = TeacherAdapter(model, 10)
    c = model.config
    common = dict(n=cfg.eval_samples, batch=500, shape=(1, 28, 28), num_classes=c.num_classes, gw=cfg.eval_gw,
                  seed=cfg.seed + 777, device=torch.device("cpu"))
    table, where = evaluate.teacher_table(adapter, str(path), {**common, "teacher_steps": cfg.teacher_steps})
    assert where == "shipped" and sorted(table["fd"]) == [1, 2, 4, 32]
    assert table["endpoints"].shape == (cfg.eval_samples, 1, 28, 28)
    fresh = evaluate.compute_teacher_table(adapter, {"heun_steps": [1, 2]}, common)
    for steps in (1, 2):
        assert table["fd"][steps] == pytest.approx(fresh["fd"][steps], rel=1e-6), steps
    assert table["fd"][32] == pytest.approx(demo.features.mnist_fd(table["endpoints"]), rel=1e-9)
    g = torch.Generator().manual_seed(cfg.seed + 777)
    z = torch.randn(500, 1, 28, 28, generator=g)
    y = torch.randint(0, c.num_classes, (500,), generator=g)
    with torch.no_grad():
        x = adapter.sample(z[:64], y[:64], torch.full((64,), cfg.eval_gw), steps=cfg.teacher_steps)
    torch.testing.assert_close(table["endpoints"][:64], x, rtol=0, atol=1e-4)


def test_the_endpoint_distance_is_to_the_teacher_steps_endpoints_also_below_four_steps(tmp_path):
    """With ``teacher_steps`` = 2 the endpoint distance is to the 2-step endpoints (no table: tables keep their
    largest step count's), written out here from the same noises."""
    model = _tiny_teacher(tmp_path / "t.pt")
    student = FlowMapStudent.from_teacher(model).eval()
    adapter = TeacherAdapter(model, 10)
    result = evaluate.evaluate_student(student, adapter, samples=40, gw=1.5, teacher_steps=2, seed=3,
                                       device=torch.device("cpu"), batch=16, teacher_path=str(tmp_path / "t.pt"))
    common = dict(n=40, batch=16, shape=(1, 28, 28), num_classes=10, gw=1.5, seed=3, device=torch.device("cpu"))
    teacher_x = evaluate._generate(lambda z, y, g: adapter.sample(z, y, g, steps=2), **common)
    student_x = evaluate._generate(student.sample, **common)
    want = float((student_x - teacher_x).flatten(1).norm(dim=1).mean())
    assert result["student_to_teacher_endpoint_l2"] == pytest.approx(want, rel=1e-6)
    assert result["teacher_table"] == "computed"
