"""attnlab.train and attnlab.models: a short run learns, logs, and writes a checkpoint that reloads exactly."""
import json
import os

import pytest
import torch

from attnlab.models import TinyTransformer, for_task
from attnlab.tasks import MQAR, Algorithmic, LinearRegressionICL, ScanSnap
from attnlab.train import TrainConfig, evaluate, load_checkpoint, lr_at, train


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: one thread is faster, and far faster when other jobs share the 2 cores.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_short_run_lowers_loss_and_checkpoint_reloads(tmp_path):
    task = ScanSnap(context_len=15)
    torch.manual_seed(0)
    model = for_task(task, "softmax", d_model=32, n_layers=1, pos="none")
    held_out = task.sample(256, seed=123)
    before, _ = evaluate(model, task, held_out)
    result = train(model, task, TrainConfig(steps=60, lr=3e-3, batch_size=32, eval_every=20, progress=False,
                                            out_dir=str(tmp_path)))
    after, _ = evaluate(model, task, held_out)
    assert after < 0.8 * before
    assert [h["step"] for h in result.history] == [20, 40, 60]
    log = json.load(open(tmp_path / "log.json"))
    assert log["history"] == result.history and log["model"]["mechanism"] == "softmax"
    reloaded = load_checkpoint(result.checkpoint)
    assert os.path.basename(result.checkpoint) == "model.safetensors"
    x = held_out.inputs[:8]
    torch.testing.assert_close(reloaded.eval()(x), model.eval()(x), rtol=0, atol=0)


def test_seeded_runs_repeat():
    task = Algorithmic("min", seq_len=6)
    runs = []
    for _ in range(2):
        torch.manual_seed(1)
        model = for_task(task, d_model=16, n_layers=1, mlp_ratio=2)
        runs.append(train(model, task, TrainConfig(steps=10, eval_every=5, eval_examples=64, progress=False)).history)
    assert [h["metric"] for h in runs[0]] == [h["metric"] for h in runs[1]]


def test_target_stops_early():
    task = Algorithmic("min", seq_len=4)
    model = for_task(task, d_model=16, n_layers=1)
    result = train(model, task, TrainConfig(steps=50, eval_every=5, target=1e9, progress=False))
    assert result.steps == 5  # mse <= 1e9 at the first eval


def test_lr_schedule():
    lrs = [lr_at(s, 100, 1.0, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] < 1e-3


def test_model_shapes_and_causality():
    torch.manual_seed(0)
    task = MQAR(32, 2, 64)
    model = for_task(task, "softmax", d_model=16, n_layers=2, n_heads=2, short_conv=3).eval()
    x = task.sample(2, seed=0).inputs
    y = model(x)
    assert y.shape == (2, 32, 64)
    x2 = x.clone()
    x2[:, 20:] = (x2[:, 20:] + 1) % 64
    torch.testing.assert_close(model(x2)[:, :20], y[:, :20])
    reg = for_task(LinearRegressionICL(), d_model=16, pos="none")
    assert reg(torch.randn(3, 41, 6)).shape == (3, 41, 1)


def test_model_errors():
    with pytest.raises(ValueError, match="mechanism"):
        TinyTransformer("no-such", vocab_size=8)
    with pytest.raises(ValueError, match="vocab_size"):
        TinyTransformer("softmax", vocab_size=8, in_dim=3)
    with pytest.raises(ValueError, match="pos"):
        TinyTransformer("softmax", vocab_size=8, pos="rope")
    with pytest.raises(ValueError, match="max_len"):
        TinyTransformer("softmax", vocab_size=8, max_len=4)(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="steps"):
        train(TinyTransformer("softmax", vocab_size=8), ScanSnap(), TrainConfig(steps=0))


def test_softmax_learns_tiny_mqar():
    task = MQAR(32, 2, 64)
    torch.manual_seed(0)
    model = for_task(task, "softmax", d_model=32, n_layers=2, n_heads=2, short_conv=2)
    result = train(model, task, TrainConfig(steps=300, lr=3e-3, eval_every=20, target=0.99, progress=False))
    assert result.best >= 0.99, result.history  # chance is 1 / 32 values


def test_train_adds_module_aux_losses():
    """MoH's load-balance loss (module.aux_loss) reaches the router's gradient through train()."""
    from attnlab.mechanisms.moh import MoHAttention
    from attnlab.train import aux_losses

    torch.manual_seed(0)
    m = MoHAttention(32, 4, causal=True)
    x = torch.randn(2, 16, 32)
    m(x)
    total = aux_losses(torch.nn.Sequential(m))
    assert isinstance(total, torch.Tensor) and total.item() > 0
    assert torch.allclose(total, m.aux_loss)
    assert aux_losses(torch.nn.Linear(2, 2)) == 0.0
