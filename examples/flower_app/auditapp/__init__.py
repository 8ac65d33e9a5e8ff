"""Example Flower app audited by fedleak."""
