"""ebike-edge: the vehicle-side agent of connected electric two-wheelers."""

__version__ = "0.1.0"
