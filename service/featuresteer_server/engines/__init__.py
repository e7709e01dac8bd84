"""Engines: the model behind one interface (``base.Engine``)."""
