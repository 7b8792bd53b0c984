"""`keras-prune lenet300` and `keras-prune lenet5`: Han et al.'s networks,
every layer pruned to its own target, with distillation and a guard."""

import os
import signal
import time

import keras
import numpy as np
import pytest

import keras_prune as kp
from keras_prune.cli import main
from keras_prune.experiments.lenet import (
    DENSE_DECAY_BUILDERS,
    SCHEDULE_BUILDERS,
    TEACHER_NETWORKS,
    DistillationLoss,
    ShiftedImages,
    compile_model,
    held_out,
    layer_schedule,
    lenet5,
    lenet300,
    run,
    settings,
    train_network,
    train_teacher,
)
from keras_prune.experiments.lenet_report import DENSE_RATES
from keras_prune.experiments.mnist import Data
from keras_prune.experiments.progress import RunFolder
from keras_prune.experiments.settings import (
    DENSE_DECAYS,
    SCHEDULES,
    TEACHERS,
    Lenet5Config,
    Lenet300Config,
)
from tests.backend_utils import end_to_end_once, same_without_native_kernel
from tests.test_mnist import MNIST, finish, keras_prune_command, read_rows

# --tolerance 1: the guard never undoes a cut, so the targets are reached
# exactly and a resumed run must give the same table.
OPTIONS = ("--quick", "--train-samples", "2500", "--test-samples", "500",
           "--validation", "500", "--tolerance", "1")  # fmt: skip


def test_networks_have_the_papers_shapes():
    assert [w.shape for w in lenet300().weights[::2]] == [
        (784, 300), (300, 100), (100, 10),
    ]  # fmt: skip
    assert [w.shape for w in lenet5().weights[::2]] == [
        (5, 5, 1, 20), (5, 5, 20, 50), (800, 500), (500, 10),
    ]  # fmt: skip


def test_shifted_images_move_each_image_by_at_most_the_shift():
    images = np.zeros((50, 28, 28, 1), "float32")
    images[:, 14, 14, 0] = 1.0  # one lit pixel in the middle
    x, y = ShiftedImages(images, np.arange(50), shift=2, batch_size=50, seed=3)[0]
    rows, columns = np.nonzero(x[..., 0])[1:]
    assert x.sum() == 50  # nothing falls off
    assert set(rows) <= set(range(12, 17)) and set(columns) <= set(range(12, 17))
    assert len(set(zip(rows, columns, strict=True))) > 10  # not all the same shift
    assert sorted(y[:, 0]) == list(range(50))
    again = ShiftedImages(images, np.arange(50), shift=2, batch_size=50, seed=3)
    np.testing.assert_array_equal(x, again[0][0])  # the seed fixes the epochs
    again.on_epoch_end()
    assert not np.array_equal(x, again[0][0])  # and each epoch draws anew


def test_shifted_images_carry_the_teachers_logits():
    # Dropout shows a teacher run in training mode; 5 images in batches of 3
    # leave a short last batch.
    layers = keras.layers
    teacher = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            layers.Flatten(),
            layers.Dropout(0.5),
            layers.Dense(10),
        ]
    )
    images = np.random.default_rng(0).random((5, 28, 28, 1)).astype("float32")
    batches = ShiftedImages(
        images, np.arange(5), shift=0, batch_size=3, teacher=teacher
    )
    for x, y in (batches[0], batches[1]):
        assert y.shape == (len(x), 11)
        expected = keras.ops.convert_to_numpy(teacher(x, training=False))
        np.testing.assert_allclose(y[:, 1:], expected, rtol=1e-5, atol=1e-6)
    assert len(batches[1][0]) == 2


def test_pruning_trains_with_adamw_only_given_a_weight_decay():
    model = lenet300()
    compile_model(model, 1e-3, Lenet300Config())
    assert type(model.optimizer) is keras.optimizers.Adam
    model = kp.make_prunable(model)
    kp.add_variational_dropout(model, examples=100)
    compile_model(model, 1e-3, Lenet300Config(), weight_decay=0.05)
    assert type(model.optimizer) is keras.optimizers.AdamW
    assert model.optimizer.weight_decay == pytest.approx(0.05)
    # The decay shrinks the weights, never variational dropout's noise.
    decayed = {
        v.name
        for v in model.trainable_variables
        if model.optimizer._use_weight_decay(v)
    }
    assert decayed == {"kernel", "bias"}


def test_distillation_is_cross_entropy_plus_the_softened_teacher():
    student = np.array([[1.0, 0.0, -1.0]])
    teacher = np.array([[0.0, 2.0, 0.0]])
    label = np.array([[1.0]])
    t = 2.0
    p = np.exp(teacher / t) / np.exp(teacher / t).sum()
    q = np.exp(student / t) / np.exp(student / t).sum()
    hard = -np.log(np.exp(student[0, 1]) / np.exp(student).sum())
    soft = (p * np.log(p / q)).sum() * t * t
    loss = DistillationLoss(weight=0.25, temperature=t)
    value = float(loss(np.concatenate([label, teacher], 1), student))
    assert value == pytest.approx(0.75 * hard + 0.25 * soft, rel=1e-5)
    assert float(loss(label, student)) == pytest.approx(hard, rel=1e-5)


def test_validation_must_leave_training_images():
    data = Data(np.zeros((10, 28, 28, 1)), np.zeros(10), np.zeros((2, 28, 28, 1)),
                np.zeros(2))  # fmt: skip
    train, (x, y) = held_out(data, 3)
    assert len(train.x_train) == 7 and x.shape == (3, 28, 28, 1) and y.shape == (3, 1)
    with pytest.raises(ValueError, match=r"Received: --validation=10 of 10"):
        held_out(data, 10)


def random_images():
    """64 random training images and labels, enough to train for a step."""
    rng = np.random.default_rng(0)
    return Data(rng.random((64, 28, 28, 1), "float32"), rng.integers(0, 10, 64),
                None, None)  # fmt: skip


def test_the_teacher_is_the_one_asked_for_and_read_back_on_resume(tmp_path):
    data = random_images()
    dense = lenet300()
    options = dict(dense_epochs=1, batch_size=32, out=str(tmp_path))

    def teacher(config):
        folder = RunFolder(str(tmp_path), settings(config), resume=True)
        return train_teacher(config, dense, data, folder, verbose=0)

    assert teacher(Lenet300Config(teacher="dense", **options)) is dense
    assert teacher(Lenet300Config(teacher="lenet5", distill=0, **options)) is None
    # LeNet-5's own dense network is the LeNet-5 teacher.
    assert teacher(Lenet5Config(teacher="lenet5", **options)) is dense
    config = Lenet300Config(teacher="lenet5", **options)
    trained = teacher(config)
    assert [w.shape for w in trained.weights[::2]] == [
        w.shape for w in lenet5().weights[::2]
    ]
    again = teacher(config)  # a resumed run reads it back, untrained
    assert again is not trained
    for before, after in zip(trained.weights, again.weights, strict=True):
        np.testing.assert_array_equal(before.numpy(), after.numpy())


def test_every_teacher_choice_has_a_network():
    # settings imports without Keras, so the choices and builders live apart.
    assert sorted(TEACHERS) == sorted(["dense", *TEACHER_NETWORKS])


def test_a_bad_teacher_is_named():
    with pytest.raises(ValueError, match=r"--teacher .*one of dense, lenet5\. "
                       r"Received: --teacher='vgg'"):  # fmt: skip
        Lenet300Config(teacher="vgg").validate()


def test_each_schedule_ends_on_the_layers_target_after_prune_epochs():
    # Kept fraction 1/8 over 3 epochs: geometric keeps half of the survivors
    # at each cut (1/2, 1/4, 1/8); the cubic gives 1 - 7/8 * (1 - (1 - k/3)^3).
    def kept(schedule):
        config = Lenet300Config(prune_epochs=3, schedule=schedule)
        return [1 - layer_schedule(config, 1 / 8)(epoch) for epoch in range(5)]

    halves = [1 / 2, 1 / 4, 1 / 8, 1 / 8, 1 / 8]
    np.testing.assert_allclose(kept("geometric"), halves)
    cubic = [1 - 7 / 8 * (1 - (1 - k / 3) ** 3) for k in (1, 2, 3)]
    np.testing.assert_allclose(kept("polynomial"), [*cubic, 1 / 8, 1 / 8])
    # A layer kept whole is never cut; a factor that is not a power of two
    # still ends exactly on the target, at the last of the 60 epochs.
    config = Lenet300Config(schedule="geometric")
    assert [layer_schedule(config, 1.0)(epoch) for epoch in range(70)] == [0.0] * 70
    assert layer_schedule(config, 0.4)(58) < 0.6 == layer_schedule(config, 0.4)(59)
    assert sorted(SCHEDULES) == sorted(SCHEDULE_BUILDERS)


def test_dense_training_decays_its_learning_rate_to_zero_unless_asked_not_to():
    data = random_images()

    def final_rate(decay):
        config = Lenet300Config(dense_epochs=2, batch_size=32, dense_decay=decay)
        model = train_network(lenet300, config, data, verbose=0)
        assert int(model.optimizer.iterations) == 4  # 2 epochs of 2 batches
        return float(model.optimizer.learning_rate)

    # Cosine from 1e-3 over 4 steps: the rate after the last one is 0.
    assert final_rate("cosine") == pytest.approx(0.0, abs=1e-9)
    assert final_rate("none") == pytest.approx(1e-3)
    assert sorted(DENSE_DECAYS) == sorted(DENSE_DECAY_BUILDERS) == sorted(DENSE_RATES)
    with pytest.raises(ValueError, match=r"--dense-decay .*one of cosine, none\. "
                       r"Received: --dense-decay='step'"):  # fmt: skip
        Lenet300Config(dense_decay="step").validate()


def test_a_run_recorded_before_dense_decay_existed_resumes_only_without_it(
    tmp_path, capsys
):
    # Such a run trained its dense network at a constant learning rate.
    out = str(tmp_path / "old")
    recorded = settings(Lenet300Config(out=out))
    del recorded["dense_decay"]
    RunFolder(out, recorded).record([{"epoch": 0}])
    assert main(["lenet300", "--out", out, "--resume"]) == 2
    assert "dense_decay='cosine' (the run has 'none')" in capsys.readouterr().err


def test_a_bad_weight_decay_is_named():
    with pytest.raises(ValueError, match=r"--weight-decay .*>= 0\. "
                       r"Received: --weight-decay=-0\.1"):  # fmt: skip
        Lenet5Config(weight_decay=-0.1).validate()


def test_a_bad_schedule_is_named():
    with pytest.raises(ValueError, match=r"--schedule .*one of polynomial, "
                       r"geometric\. Received: --schedule='cosine'"):  # fmt: skip
        Lenet5Config(schedule="cosine").validate()


def test_a_bad_lenet_option_stops_before_anything_runs(tmp_path, capsys):
    status = main(["lenet5", "--kept-conv1", "1.5", "--out", str(tmp_path / "r")])
    assert status == 2
    assert "Expected --kept-conv1 (a kept fraction) in (0, 1]. Received: " in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "r").exists()


def lenet_command(name, *options):
    return keras_prune_command(name, *OPTIONS, *options)


@pytest.fixture(scope="module")
def lenet300_run(tmp_path_factory):
    if not os.path.isfile(MNIST):
        pytest.skip(f"needs the shared MNIST file at {MNIST}")
    out = tmp_path_factory.mktemp("lenet300")
    status, stdout, stderr = finish(
        lenet_command("lenet300", "--data", MNIST, "--out", str(out))
    )
    assert status == 0, stderr
    return out, stdout


@same_without_native_kernel
def test_lenet300_reaches_every_layers_target_and_reports_it(lenet300_run):
    out, printed = lenet300_run
    assert "Sparse VD" in printed and "| fc1 | 235,200 | 1.00% | 2,352 |" in printed
    assert "| keras_prune's teacher (a dense LeNet-5" in printed  # the default
    rows = read_rows(out)
    assert [row["phase"] for row in rows] == ["dense", "prune", "prune", "prune",
                                              "tune"]  # fmt: skip
    last = rows[-1]
    assert [float(last[f"kept_{n}"]) for n in ("fc1", "fc2", "fc3")] == pytest.approx(
        [0.01, 0.03333333, 0.5]
    )
    assert float(last["kept"]) == pytest.approx((2352 + 1000 + 500) / 266_200)
    # Chance is 90% error; quick mode prunes to 1.45% in three short epochs.
    assert float(rows[0]["test_error"]) < 0.4
    assert all(0 < float(row["test_error"]) < 0.85 for row in rows)
    pruned = keras.saving.load_model(out / "pruned.keras")
    kernel = pruned.get_layer("fc1").kernel.numpy()
    assert np.count_nonzero(kernel) == 2352
    report = (out / "report.md").read_text()
    assert "Quick mode" in report and "**last epoch's**" in report
    assert "Sensitivity of the dense network" in report
    with open(out / "sensitivity.csv") as file:
        assert len(file.readlines()) == 1 + 3 * 8
    for png in ("error_vs_kept.png", "sensitivity.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


@same_without_native_kernel
def test_lenet5_prunes_the_convolutions_too(tmp_path):
    if not os.path.isfile(MNIST):
        pytest.skip(f"needs the shared MNIST file at {MNIST}")
    config = Lenet5Config(
        data=MNIST, out=str(tmp_path), quick=True, train_samples=1200,
        test_samples=300, validation=300, prune_epochs=2, tolerance=1.0,
        kept_conv1=0.3, kept_conv2=0.02, kept_fc1=0.002, kept_fc2=0.05,
        schedule="geometric", weight_decay=0.05,
    )  # fmt: skip
    folder = RunFolder(str(tmp_path), settings(config))
    result = run(config, verbose=0, folder=folder)
    # The pruning trained with AdamW's decoupled weight decay (the dense
    # network without).
    optimizers = {
        name: folder.load_model(name).optimizer for name in ("dense", "masked")
    }
    assert type(optimizers["dense"]) is keras.optimizers.Adam
    assert type(optimizers["masked"]) is keras.optimizers.AdamW
    assert optimizers["masked"].weight_decay == pytest.approx(0.05)
    # The geometric schedule's first of two cuts keeps sqrt(kept) of each
    # layer (the cubic would keep kept + (1 - kept) / 8: 38.75% of conv1).
    first = result.rows[1]
    assert first["phase"] == "prune"
    assert first["kept_conv1"] == pytest.approx(0.3**0.5, abs=1 / 500)
    assert first["kept_fc2"] == pytest.approx(0.05**0.5, abs=1 / 5000)
    last = result.rows[-1]
    kept = {n: last[f"kept_{n}"] for n in ("conv1", "conv2", "fc1", "fc2")}
    assert kept == pytest.approx(
        {"conv1": 0.3, "conv2": 0.02, "fc1": 0.002, "fc2": 0.05}
    )
    assert last["kept"] == pytest.approx((150 + 500 + 800 + 250) / 430_500)
    assert list(result.scan.values) == ["conv1", "conv2", "fc1", "fc2"]


@end_to_end_once
def test_a_stopped_lenet_run_resumes_to_the_same_table(lenet300_run, tmp_path):
    out = tmp_path / "run"
    process = lenet_command("lenet300", "--data", MNIST, "--out", str(out))
    while not (out / "rounds.csv").exists() or len(read_rows(out)) < 3:
        assert process.poll() is None, process.communicate()[1]
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    status, _, stderr = finish(process)
    assert status == 130, stderr
    assert "**Stopped after epoch" in (out / "report.md").read_text()
    status, _, stderr = finish(
        lenet_command("lenet300", "--data", MNIST, "--out", str(out), "--resume")
    )
    assert status == 0, stderr
    assert read_rows(out) == read_rows(lenet300_run[0])


@same_without_native_kernel
def test_variational_ranking_prunes_with_noise_and_retrains_without(tmp_path):
    if not os.path.isfile(MNIST):
        pytest.skip(f"needs the shared MNIST file at {MNIST}")
    base = dict(
        data=MNIST, quick=True, train_samples=1200, test_samples=300,
        validation=300, prune_epochs=2, tolerance=1.0, ranking="variational",
    )  # fmt: skip
    for tune_epochs in (0, 1):
        out = tmp_path / f"tune{tune_epochs}"
        config = Lenet300Config(out=str(out), tune_epochs=tune_epochs, **base)
        folder = RunFolder(str(out), settings(config))
        result = run(config, verbose=0, folder=folder)
        last = result.rows[-1]
        assert [last[f"kept_{n}"] for n in ("fc1", "fc2", "fc3")] == pytest.approx(
            [0.01, 0.03333333, 0.5], abs=1 / 30_000
        )
        masked = folder.load_model("masked")
        noise = [
            hasattr(layer, "variational_dropout") for layer in kp.masked_layers(masked)
        ]
        pruned = keras.saving.load_model(out / "pruned.keras")
        assert not any("log_sigma2" in v.path for v in pruned.weights)
        if tune_epochs:  # retrained without the noise, by a new optimizer
            assert noise == [False] * 3
            slots = [v.path for v in masked.optimizer.variables]
            assert not any("log_sigma2" in path for path in slots), slots
        else:  # a run stopped here resumes with the noise it learned
            assert noise == [True] * 3
            log_sigma2 = masked.get_layer("fc1").variational_dropout.log_sigma2
            assert np.ptp(log_sigma2["kernel"].numpy()) > 0
