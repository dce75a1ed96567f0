"""Noise search: the verifier's best candidate goes to the teacher, NFE accounting, verifiers, --mode search."""
import numpy as np
import pytest
import torch

from freeflow.distill import TeacherAdapter
from freeflow.models import DiT, DiTConfig, FlowMapStudent, save_checkpoint
from freeflow.sample import main
from freeflow.search import ClassifierVerifier, NoiseSearch, load_verifier


class _Student:
    """F(z, δ) = 0.5·z: the one-step sample is z/2."""

    def sample(self, z, y, gw, delta=None):
        return 0.5 * z


def _teacher(x, t, y):
    """A plain velocity field in the internal convention: v = x + (y + 1)·t (per row)."""
    return x + ((y.float() + 1) * t).view(-1, *([1] * (x.dim() - 1)))


def test_search_hands_the_best_candidate_to_the_teacher_and_counts_nfe():
    g = torch.Generator().manual_seed(0)
    n, k = 3, 5
    z = torch.randn(n, k, 2, 2, generator=g)
    y = torch.tensor([0, 1, 2])
    gw = torch.full((n,), 2.0)
    target = torch.tensor([[0.3, -0.2, 0.1, 0.4]]).view(1, 2, 2)
    verifier = lambda x, yy: -((x - target) ** 2).flatten(1).sum(1)  # noqa: E731
    search = NoiseSearch(_Student(), TeacherAdapter(_teacher, 3), verifier, method="euler", steps=2,
                         interval=(0.0, 0.5))
    out = search(z, y, gw)
    # independently: the candidate whose z/2 is closest to the target
    dist = ((0.5 * z - target) ** 2).flatten(2).sum(2)
    want_best = dist.argmin(1)
    assert torch.equal(out.best, want_best)
    x = z[torch.arange(n), want_best]
    torch.testing.assert_close(out.noises, x)
    # two Euler steps of the guided field; guidance only for t in [0, 0.5]: at t = 1 conditional, at t = 0.5 guided
    null = torch.full_like(y, 3)
    x = x + (0.5 - 1.0) * _teacher(x, torch.full((n,), 1.0), y)
    cond, uncond = _teacher(x, torch.full((n,), 0.5), y), _teacher(x, torch.full((n,), 0.5), null)
    x = x + (0.0 - 0.5) * (uncond + 2.0 * (cond - uncond))
    torch.testing.assert_close(out.samples, x)
    assert out.nfe == k + 1 + 2 and out.verifier_calls == k  # K student rows + 1 conditional + 1 CFG pair
    assert out.scores.shape == (n, k)


def test_classifier_verifier_is_the_log_probability_of_the_class():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    v = ClassifierVerifier(lambda x: logits)
    got = v(torch.zeros(2, 1), torch.tensor([0, 2]))
    want = [2.0 - np.log(np.exp(2) + 1 + np.exp(-1)), 3.0 - np.log(2 * np.exp(0.5) + np.exp(3))]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)


class _Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.fc = torch.nn.Linear(64, 3)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_load_verifier_from_torchscript_and_module_callable(tmp_path):
    path = tmp_path / "clf.pt"
    net = _Linear().eval()
    torch.jit.script(net).save(str(path))
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    want = net(x).log_softmax(1)[torch.arange(4), y]
    torch.testing.assert_close(load_verifier(str(path))(x, y), want)
    torch.export.save(torch.export.export(net, (x,)), str(tmp_path / "clf.pt2"))
    torch.testing.assert_close(load_verifier(str(tmp_path / "clf.pt2"))(x, y), want)
    f = load_verifier("torch:ones_like")  # any importable callable f(x, y)
    assert f is torch.ones_like
    scores = load_verifier("mnist")(torch.zeros(2, 1, 28, 28), torch.tensor([0, 1]))
    assert scores.shape == (2,) and (scores <= 0).all()
    for spec, match in (("nope.pt", "no such file"), ("json:nothing_here", "cannot import"),
                        (str(tmp_path / "c.json"), "not a TorchScript")):
        if spec.endswith("c.json"):
            (tmp_path / "c.json").write_text("{}")
        with pytest.raises(ValueError, match=f"--verifier .*{match}"):
            load_verifier(spec)


def test_sample_mode_search_writes_the_searched_teacher_samples(tmp_path):
    torch.manual_seed(0)
    cfg = DiTConfig(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=3,
                    learn_sigma=False)
    teacher = DiT(cfg, family="internal", backend="reference")
    with torch.no_grad():
        for p in teacher.parameters():
            p.normal_(0, 0.1)
    student = FlowMapStudent.from_teacher(teacher).eval()
    save_checkpoint(teacher, str(tmp_path / "t.pt"))
    save_checkpoint(student.net, str(tmp_path / "s.pt"))
    net = _Linear().eval()
    torch.jit.script(net).save(str(tmp_path / "clf.pt"))
    out = tmp_path / "search.npz"
    assert main(["--mode", "search", "--student", str(tmp_path / "s.pt"), "--teacher", str(tmp_path / "t.pt"),
                 "--verifier", str(tmp_path / "clf.pt"), "--candidates", "4", "--solver", "euler", "--steps", "2",
                 "--num-samples", "5", "--batch-size", "2", "--png", "", "--npz", str(out)]) == 0
    from freeflow.sample import draw

    z, y = draw(0, range(5), (1, 8, 8), 3, candidates=4)
    res = NoiseSearch(student, TeacherAdapter(teacher.eval(), 3), ClassifierVerifier(net), method="euler",
                      steps=2)(z, y, torch.full((5,), 1.5))
    want = ((res.samples.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).repeat(1, 1, 1, 3)
    got = np.load(out)["arr_0"].astype(int)
    assert np.abs(got - want.numpy().astype(int)).max() <= 1
    assert res.nfe == 4 + 2 * 2


def test_the_demo_table_uses_the_teacher_the_student_was_distilled_from(tmp_path, capsys):
    import json

    from freeflow.demo import ASSETS_DIR, DEMO_TEACHER_FILE
    from freeflow.search import main as search_main
    from freeflow.search import run_teacher_path

    run = tmp_path / "run"
    run.mkdir()
    student = run / "student_ema.pt"
    # No config.json (a student copied elsewhere): the demo preset's teacher.
    assert run_teacher_path(str(student)) == str(ASSETS_DIR / DEMO_TEACHER_FILE)
    # A run's config.json (as python -m freeflow.train writes it): the teacher file it records.
    (run / "config.json").write_text(json.dumps({"train": {"teacher_ckpt": ""}, "teacher_path": "/a/teacher.pt"}))
    assert run_teacher_path(str(student)) == "/a/teacher.pt"
    student.write_bytes(b"")
    assert search_main(["--student", str(student), "--teacher", str(tmp_path / "missing.pt")]) == 2
    assert "--teacher" in capsys.readouterr().err
