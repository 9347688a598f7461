"""reinitd: tells a prebuilt workspace's agent the moment a user claims the workspace."""

__version__ = "0.1.0"
