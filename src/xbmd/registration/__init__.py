"""2D-3D registration of a CT's bones to a radiograph, and its overlays."""
