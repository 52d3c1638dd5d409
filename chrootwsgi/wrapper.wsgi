# chrootwsgi drop-in wrapper: serves the app named in the site's config file from its jail.
# Name this file in WSGIImportScript and WSGIScriptAlias; `chrootwsgi wrapper-path` prints its
# path, `chrootwsgi apache-config` prints a whole site configuration, and the chrootwsgi.wrapper
# module documents where the config file is found.
from chrootwsgi.wrapper import load_application

application = load_application()
