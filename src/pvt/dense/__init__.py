"""What the dense tasks (detection, segmentation) share: FPN wiring, OpenCV-exact resize, neck conversion."""
