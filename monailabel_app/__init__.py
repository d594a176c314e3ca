"""MONAI Label app of the bundle (``monailabel start_server --app monailabel_app``); see ``main.py``."""
