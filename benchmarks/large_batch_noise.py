"""Wen et al. (AISTATS 2020), Table 2: large-batch SGD with Fisher-shaped noise, ResNet-44 / CIFAR-10.

Runs (one invocation, ``--batch-sizes 128 4096``): SB = plain SGD at M_S = 128; LB = plain SGD
at M_L = 4096; LB + Fisher trace noise (``noise_trace``) and LB + diagonal Fisher noise
(``noise_diag``), both ``FisherNoiseSGD`` with ``small_batch_size = M_S`` and the empirical
Fisher (true labels, ``--fisher empirical``) re-estimated every step (``--noise-every 1``), as in
the paper. ``--methods baseline noise_trace noise_diag noise_full`` adds LB + full Fisher (one
extra forward/backward per step). Noise methods are made only for batch sizes above M_S.

Setting (what the paper fixes, and our choices where it does not):

* Ghost BatchNorm (virtual batch 128) for every large-batch run (``--ghost-batch-size``); the
  SB run uses plain BatchNorm (identical at 128).
* Same number of epochs for every method. The paper does not state the ResNet-44 schedule;
  we use He et al.'s (2016) ResNet-44 recipe counted in epochs: 164 epochs (64k iterations at
  batch 128), LR × 0.1 at epochs 82 and 123, momentum 0.9, weight decay 1e-4, standard
  augmentation (random crop with 4-pixel padding + horizontal flip), 5000 training images held
  out for validation (the paper reports validation accuracy).
* Learning rate: the paper tunes the schedule per method and does not report it. Default:
  η_SB = 0.1 (``--lr-star``) and square-root scaling with the batch size (``--lr-scaling sqrt``,
  Hoffer et al., 2017, the Ghost BatchNorm paper), η_LB = 0.1 · sqrt(4096/128) ≈ 0.566 for all
  LB runs. ``--lr-scaling linear --lr-cap 1.6`` gives the (capped) linear scaling rule (no
  warm-up is implemented), ``--batch-lrs 0.1 0.8`` explicit rates per batch size.
* ``train_curve.jsonl`` (training loss/error of every update, their Fig. 3) is written for every
  run (``--no-log-every-update`` turns it off). The results table adds ``train err``, the
  running training error (%) of the last epoch.

``--model vgg16_bn`` gives the VGG16 row, ``--model resnet44_b`` projection shortcuts.
``--quick`` is a CPU smoke run (1000 training images: the LB runs take one step per epoch).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common.cli import main
from benchmarks.common.config import ExperimentConfig

CONFIG = ExperimentConfig(
    name="large_batch_noise",
    dataset="cifar10",
    model="resnet44",
    description=__doc__.split("\n\n")[0],
    epochs=164,
    milestones=(82, 123),
    weight_decay=1e-4,
    batch_sizes=(128, 4096),
    lr_factors=(1.0,),
    small_lr_divisor=1.0,
    augment="standard",
    default_methods=("baseline", "noise_trace", "noise_diag"),
    augment_methods=("baseline", "noise_trace", "noise_diag"),
    ghost_batch_size=128,
    lr_scaling="sqrt",
    log_every_update=True,
)

if __name__ == "__main__":
    raise SystemExit(main(CONFIG))
