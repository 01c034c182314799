"""opdgeom."""
