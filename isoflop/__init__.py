"""isoflop: is this architecture really better, and by how much compute?"""

__version__ = "0.1.0"
