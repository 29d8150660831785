"""What an Ultralytics YOLO looks like to act: the heads it supports, the branch attributes of a head, and the conv
that produces each block's output channels. (Constants only: yolo.py and prune.py both read them.)"""

SUPPORTED_HEADS = ("Detect", "Pose")

# Branch attributes of the head, in the order Ultralytics concatenates them.
BRANCHES = {"cv2": "box", "cv3": "cls", "cv4": "kpt"}
# the attribute holding the conv that produces a block's output channels (Conv: its conv; the C2f family and SPPF end
# in cv2, the C3 family in cv3; SplitC2f is act's prunable C2f, prune.py)
OUTPUT_CONV = {"Conv": "conv", "C2f": "cv2", "C3k2": "cv2", "SplitC2f": "cv2", "SPPF": "cv2", "C2PSA": "cv2",
               "C3": "cv3", "C3k": "cv3", "C3x": "cv3"}
