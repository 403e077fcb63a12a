"""The client side, in the notebook kernel: Cluster, views, futures."""
