"""``python -m hubtool.assets``: redraw the shipped default image."""

from hubtool.assets import DEFAULT_IMAGE, write_default_image

if __name__ == "__main__":
    write_default_image(DEFAULT_IMAGE)
