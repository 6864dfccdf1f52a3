"""Where and how processes run: device selection now; process groups, meshes and strategies build on it."""
