-- The SQL contract, part 2: who may execute each function and use each table (docs/deployment.md
-- says why). One file on purpose: after a deliberate change of privileges, regenerate its
-- expected output alone (docs/development.md: "Regenerating a pg_regress expected file").
-- a fresh install, whatever ran before
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS pg_llm CASCADE;
RESET client_min_messages;
CREATE EXTENSION pg_llm;

-- grantees as roles every server has: PUBLIC, the owner (the superuser who created the extension)
-- and the predefined pg_* roles; NULL acl = the default (owner and PUBLIC)
CREATE FUNCTION pg_temp.grantees(acl aclitem[], owner oid, kind "char", privilege text) RETURNS text
LANGUAGE sql AS $$
  SELECT coalesce(string_agg(CASE a.grantee WHEN 0 THEN 'PUBLIC' WHEN owner THEN 'owner'
                                  ELSE a.grantee::regrole::text END, ', ' ORDER BY 1), '-')
  FROM aclexplode(coalesce(acl, acldefault(kind, owner))) a
  WHERE a.privilege_type = privilege $$;

SELECT format('%s(%s): %s', p.proname, pg_get_function_identity_arguments(p.oid),
              pg_temp.grantees(p.proacl, p.proowner, 'f', 'EXECUTE')) AS "function: who may execute it"
FROM pg_proc p
JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'pg_llm'
ORDER BY 1;

SELECT c.relname AS relation,
       pg_temp.grantees(c.relacl, c.relowner, (CASE c.relkind WHEN 'S' THEN 's' ELSE 'r' END)::"char", 'SELECT') AS "select",
       pg_temp.grantees(c.relacl, c.relowner, (CASE c.relkind WHEN 'S' THEN 's' ELSE 'r' END)::"char",
                        CASE c.relkind WHEN 'S' THEN 'USAGE' ELSE 'INSERT' END) AS "insert/usage",
       c.relrowsecurity AS rls
FROM pg_class c
JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e'
JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'pg_llm'
ORDER BY 1;

DROP EXTENSION pg_llm;
