"""Checks shared by the model modules."""


def check_images(images) -> None:
  """Raises ValueError unless ``images`` is a rank-4 NHWC batch."""
  if images.ndim != 4:
    raise ValueError(
        f"expected NHWC images of rank 4, got shape {images.shape}")
