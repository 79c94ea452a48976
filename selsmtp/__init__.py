"""selsmtp: a fast, durable, dependency-free SMTP server built on one selectors loop."""

from selsmtp.config import Config
from selsmtp.session import Session

__version__ = "0.1.0"
__all__ = ["Config", "Session", "__version__"]
