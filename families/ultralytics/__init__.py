"""The Ultralytics YOLO family: yolo.py (the family object), blocks.py (Q/DQ placement inside Ultralytics blocks),
prune.py (what torch-pruning needs), validate.py (labeled mAP with Ultralytics' validators), pseudo_labels.py
(Ultralytics' training loss against the teacher's detections: `distill.pseudo_labels`)."""

from families.ultralytics.yolo import UltralyticsYOLO

__all__ = ["UltralyticsYOLO"]
