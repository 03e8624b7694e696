"""Times cv2.Canny(rgb, 100, 200) on 512×512 RGB photos (the reference's control image).
Prints JSON {"seconds": per image, "n": images}.   /usr/bin/python3 bench/py/canny_cv2.py REPS IMG...
"""
import json, sys, time
import cv2
import numpy as np
from PIL import Image

reps = int(sys.argv[1])
imgs = [np.asarray(Image.open(p).convert('RGB').resize((512, 512))) for p in sys.argv[2:]]
cv2.setNumThreads(0)
for im in imgs:
    cv2.Canny(im, 100, 200)
t0 = time.perf_counter()
for _ in range(reps):
    for im in imgs:
        cv2.Canny(im, 100, 200)
print(json.dumps({'seconds': (time.perf_counter() - t0) / reps / len(imgs), 'n': len(imgs)}))
