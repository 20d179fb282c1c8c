"""Process groups, the device mesh, counting communication and the one process launcher."""
