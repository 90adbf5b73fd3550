-- The SQL contract, part 1: every function of pg_llm with its signature (arguments and
-- defaults, result), volatility, strictness, parallel safety and security. A change here is a
-- change of the API that users call: deliberate, in an upgrade script, and in docs/sql.md.
-- (Privileges are pinned apart, in privileges.sql.)
-- a fresh install, whatever ran before
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS pg_llm CASCADE;
RESET client_min_messages;
CREATE EXTENSION pg_llm;

SELECT format('%s(%s) -> %s: %s', p.proname, pg_get_function_arguments(p.oid), pg_get_function_result(p.oid),
              concat_ws(' ', CASE p.provolatile WHEN 'i' THEN 'immutable' WHEN 's' THEN 'stable' ELSE 'volatile' END,
                        CASE WHEN p.proisstrict THEN 'strict' END,
                        CASE p.proparallel WHEN 's' THEN 'parallel safe' WHEN 'r' THEN 'parallel restricted' END,
                        CASE WHEN p.prosecdef THEN 'security definer' END)) AS function
FROM pg_proc p
JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'pg_llm'
ORDER BY 1;

-- every other object the extension owns (tables, views, sequences; their row types left out)
SELECT pg_describe_object(d.classid, d.objid, 0) AS object
FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'pg_llm'
WHERE d.deptype = 'e' AND d.classid NOT IN ('pg_proc'::regclass, 'pg_type'::regclass)
ORDER BY 1;

-- the settings it defines (the library is loaded by the first call), their defaults and who may set them
SELECT pg_llm_version() IS NOT NULL AS loaded;
SELECT name, boot_val, unit, context, vartype FROM pg_settings WHERE name LIKE 'pg_llm.%' ORDER BY 1;

-- left created: tokenizer.sql, which runs next, expects it
