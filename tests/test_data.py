import pytest
import torch
from torchvision import transforms
from torchvision.datasets import MNIST

from mnist.augment import RandomShift
from mnist.data import FashionMNISTDataModule, KMNISTDataModule, MNISTDataModule
from mnist.errors import UserError
from mnist.loader import BatchLoader, EpochSampler
from tests.conftest import N_TEST, N_TRAIN, VAL_SIZE
from tests.fake_mnist import write_fake_mnist


def make_data(mnist_dir, **kwargs) -> MNISTDataModule:
    data = MNISTDataModule(data_dir=str(mnist_dir), val_size=VAL_SIZE, download=False, **kwargs)
    data.prepare_data()
    data.setup("fit")
    data.setup("test")
    return data


def test_split_sizes_shapes_and_dtypes(mnist_dir):
    data = make_data(mnist_dir, batch_size=32)
    assert len(data.train_labels) == N_TRAIN - VAL_SIZE
    assert len(data.val_labels) == VAL_SIZE
    assert len(data.test_labels) == N_TEST
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (32, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (32,) and y.dtype == torch.int64
    assert len(data.train_dataloader()) == -(-(N_TRAIN - VAL_SIZE) // 32)


def test_in_memory_batches_equal_torchvision_per_sample_path(mnist_dir):
    """The fast path serves what ToTensor and Normalize on each torchvision sample give, normalised once in memory."""
    data = make_data(mnist_dir)
    normalize = transforms.Normalize((MNISTDataModule.mean,), (MNISTDataModule.std,))
    reference = MNIST(str(mnist_dir), train=False, transform=transforms.Compose([transforms.ToTensor(), normalize]))
    images, labels = zip(*(reference[i] for i in range(len(reference))), strict=True)
    x, y = zip(*data.test_dataloader(), strict=True)
    assert data.normalized_with == (MNISTDataModule.mean, MNISTDataModule.std)
    torch.testing.assert_close(torch.cat(x), torch.stack(images))
    assert torch.equal(torch.cat(y), torch.tensor(labels))


@pytest.mark.parametrize(
    ("module", "folder", "first_class"),
    [(FashionMNISTDataModule, "FashionMNIST", "T-shirt/top"), (KMNISTDataModule, "KMNIST", "o")],
)
def test_other_mnist_format_datasets_load_from_their_own_folder(tmp_path, module, folder, first_class):
    write_fake_mnist(tmp_path, folder=folder)
    data = module(data_dir=str(tmp_path), val_size=VAL_SIZE, download=False)
    data.prepare_data()
    data.setup("fit")
    assert len(data.train_labels) == N_TRAIN - VAL_SIZE
    assert data.class_names[0] == first_class and data.num_classes == 10
    assert (data.mean, data.std) != (MNISTDataModule.mean, MNISTDataModule.std)
    with pytest.raises(UserError, match=f"MNIST not found.*{tmp_path / 'MNIST' / 'raw'}"):
        MNISTDataModule(data_dir=str(tmp_path), download=False).prepare_data()


def test_split_is_independent_of_the_global_seed(mnist_dir):
    torch.manual_seed(1)
    first = make_data(mnist_dir)
    torch.manual_seed(2)
    second = make_data(mnist_dir)
    assert torch.equal(first.val_images, second.val_images)
    other_seed = make_data(mnist_dir, seed=7)
    assert not torch.equal(first.val_images, other_seed.val_images)


def test_every_training_sample_is_seen_once_per_epoch_in_a_new_order():
    sampler = EpochSampler(103, shuffle=True, seed=3)
    labels = torch.arange(103)
    loader = BatchLoader(labels.float().view(-1, 1, 1, 1), labels, batch_size=10, sampler=sampler)
    epochs = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        seen = torch.cat([y for _, y in loader])
        assert sorted(seen.tolist()) == list(range(103))
        epochs.append(seen)
    assert not torch.equal(epochs[0], epochs[1])
    sampler.set_epoch(0)
    assert torch.equal(torch.cat([y for _, y in loader]), epochs[0]), "the order is a function of (seed, epoch)"


def test_processes_share_an_epoch_without_overlap():
    ranks = [EpochSampler(100, shuffle=True, seed=3, rank=r, world_size=2, even=True) for r in range(2)]
    a, b = (set(s.indices().tolist()) for s in ranks)
    assert len(a) == len(b) == 50 and not a & b and a | b == set(range(100))


def shifted(image: torch.Tensor, dy: int, dx: int, fill: float) -> torch.Tensor:
    """``image`` (C, H, W) moved down by ``dy`` and right by ``dx`` pixels, written out with slices."""
    _, h, w = image.shape
    out = torch.full_like(image, fill)
    out[:, max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = image[
        :, max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)
    ]
    return out


def test_random_shift_moves_each_image_by_its_own_shift_within_the_limit():
    images = torch.rand(64, 2, 9, 7)
    moved = RandomShift(2, fill=-1.0)(images, torch.Generator().manual_seed(0))
    shifts = set()
    for image, result in zip(images, moved, strict=True):
        matches = [
            (dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if torch.equal(result, shifted(image, dy, dx, -1.0))
        ]
        assert len(matches) == 1, "every image is its original moved by at most 2 pixels each way, filled with -1"
        shifts |= set(matches)
    assert len(shifts) > 12, f"64 images drew only {len(shifts)} of the 25 shifts"
    assert RandomShift(0)(images, torch.Generator()) is images


def test_shifted_batches_are_a_function_of_seed_epoch_and_batch_so_a_resumed_epoch_gets_the_same():
    images = torch.rand(50, 1, 6, 6)

    def loader() -> BatchLoader:
        sampler = EpochSampler(50, shuffle=True, seed=3)
        return BatchLoader(images, torch.arange(50), 8, sampler, augment=RandomShift(1))

    whole = loader()
    epoch_0 = list(whole)
    resumed = loader()
    resumed.load_state_dict({"epoch": 0, "served": 3})
    for (x, y), (x_ref, y_ref) in zip(resumed, epoch_0[3:], strict=True):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    whole.sampler.set_epoch(1)
    by_label = [{int(y): x for xs, ys in batches for x, y in zip(xs, ys, strict=True)} for batches in (epoch_0, whole)]
    assert sum(not torch.equal(by_label[0][i], by_label[1][i]) for i in range(50)) > 25, "each epoch draws new shifts"


def test_max_shift_moves_training_images_only(mnist_dir):
    plain, moving = make_data(mnist_dir), make_data(mnist_dir, max_shift=2)
    (x, y), (x_moved, y_moved) = next(iter(plain.train_dataloader())), next(iter(moving.train_dataloader()))
    assert torch.equal(y, y_moved) and not torch.equal(x, x_moved)
    # What comes into the frame is a black pixel, normalised as the images' own black pixels are.
    assert x_moved.min() == x.min() == plain.train_images.min()
    for loader in ("val_dataloader", "test_dataloader", "predict_dataloader"):
        for (a, _), (b, _) in zip(getattr(plain, loader)(), getattr(moving, loader)(), strict=True):
            assert torch.equal(a, b), loader


def test_val_size_larger_than_the_training_set(mnist_dir):
    data = MNISTDataModule(data_dir=str(mnist_dir), val_size=N_TRAIN, download=False)
    with pytest.raises(UserError, match=f"val_size \\({N_TRAIN}\\) must be smaller than the {N_TRAIN} training"):
        data.setup("fit")


def test_missing_data_names_the_files_and_where(tmp_path):
    data = MNISTDataModule(data_dir=str(tmp_path), download=False)
    with pytest.raises(UserError) as err:
        data.prepare_data()
    message = str(err.value)
    assert f"{tmp_path}/MNIST/raw" in message and "train-images-idx3-ubyte" in message and "download" in message


def test_failed_download_says_what_to_do(tmp_path, monkeypatch):
    def offline(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried http://x, got:\n<urlopen error>")

    monkeypatch.setattr(MNIST, "download", offline)
    with pytest.raises(UserError, match="could not download MNIST .*<urlopen error>.*MNIST/raw"):
        MNISTDataModule(data_dir=str(tmp_path), download=True).prepare_data()


@pytest.mark.parametrize(
    ("name", "damage", "expected"),
    [
        ("train-images-idx3-ubyte", lambda b: b[: len(b) // 2], "truncated or corrupted"),
        ("t10k-labels-idx1-ubyte", lambda b: b + b"\0", "truncated or corrupted"),
        ("train-labels-idx1-ubyte", lambda b: b"<html>" + b[6:], "not an IDX file"),
        ("t10k-images-idx3-ubyte", lambda b: b[:4], "not an IDX file"),
    ],
)
def test_corrupted_file_is_named(tmp_path, name, damage, expected):
    raw = write_fake_mnist(tmp_path, n_train=50, n_test=20)
    (raw / name).write_bytes(damage((raw / name).read_bytes()))
    data = MNISTDataModule(data_dir=str(tmp_path), val_size=10, download=False)
    with pytest.raises(UserError, match=f"{name} .*{expected}"):
        data.setup("fit")
