"""The SQLite index: connection, migrations, writer and query compiler."""
