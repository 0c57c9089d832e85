"""vision-daemon: real-time multi-camera object detection over TCP."""

import os

# Set before ultralytics is ever imported: no package installs at run time, ever.
os.environ.setdefault("YOLO_AUTOINSTALL", "False")

__version__ = "0.1.0"
