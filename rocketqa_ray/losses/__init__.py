"""Training losses, one per module (Ray-free).

- `contrastive`: the dual encoder's InfoNCE over in-batch and cross-batch negatives (RocketQA step 1, 3, 4);
- `distillation`: the dual encoder's soft targets from the cross-encoder's scores (`distill.kind`);
- `listwise`, `pointwise`: the cross-encoder's (step 2).
"""

from rocketqa_ray.losses.contrastive import PAD_KEY, contrastive_loss, passage_key
from rocketqa_ray.losses.distillation import DistillKind, distillation_loss, teacher_logits
from rocketqa_ray.losses.listwise import check_groups, listwise_loss
from rocketqa_ray.losses.pointwise import bce_loss

__all__ = ["PAD_KEY", "DistillKind", "bce_loss", "check_groups", "contrastive_loss", "distillation_loss",
           "listwise_loss", "passage_key", "teacher_logits"]
