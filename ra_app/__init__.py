"""RA review app (Flask). The app factory lands with the RA app issue."""
