-- Claim a queued arq job for this worker: what arq's Worker.start_jobs does with WATCH, EXISTS,
-- ZSCORE, MULTI, PSETEX and EXEC (five round trips), in one step. Not claimed when another worker
-- holds it, when it left the queue, or when it was queued again for later.
-- KEYS: 1 the job's in-progress key, 2 the queue
-- ARGV: 1 job id, 2 now ms, 3 in-progress timeout ms
-- Returns the job's score (ms), or false.
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local score = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then return false end
redis.call('PSETEX', KEYS[1], ARGV[3], '1')
return score
