"""CT: calibration to mineral density, phantoms, materials, femur measures and landmarks."""
