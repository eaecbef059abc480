import * as React from 'react';

import { NSMLModel } from '../model';
import { formatMetric } from '../format';

/** One dataset's leaderboard (my best rank highlighted) and my submissions with their state. */
export function LeaderboardsTab(props: {
  model: NSMLModel;
  dataset: string | null;
  onDataset: (name: string) => void;
}): JSX.Element {
  const { model } = props;
  const boards = model.datasets.filter(d => d.leaderboard);
  const current = props.dataset ?? boards[0]?.name ?? null;
  React.useEffect(() => {
    if (current && !model.boards.has(current)) {
      void model.refreshBoard(current);
    }
  }, [current]);
  const board = current ? model.boards.get(current) : undefined;
  const best = board?.rows.filter(r => r.mine).reduce((a, r) => Math.min(a, r.rank), Infinity);
  const mine = model.submissions.filter(s => !current || s.dataset.split('@')[0] === current);
  return (
    <div className="jp-NSML-tab jp-NSML-leaderboards">
      {boards.length === 0 ? (
        <div className="jp-NSML-empty">No dataset you can read has a leaderboard.</div>
      ) : (
        <div className="jp-NSML-toolbar">
          <select
            className="jp-mod-styled"
            aria-label="Leaderboard"
            value={current ?? ''}
            onChange={e => props.onDataset(e.target.value)}
          >
            {boards.map(d => (
              <option key={d.name} value={d.name}>
                {d.name}
              </option>
            ))}
          </select>
          {board && (
            <span className="jp-NSML-boardinfo">
              {board.metric ?? 'score'} ({board.higher_is_better ? 'higher' : 'lower'} is better)
              {board.closed ? ' · closed' : ''}
            </span>
          )}
        </div>
      )}
      {board && (
        <table className="jp-NSML-board" aria-label={`${board.dataset} leaderboard`}>
          <thead>
            <tr>
              <th>#</th>
              <th>user</th>
              <th>session</th>
              <th>score</th>
            </tr>
          </thead>
          <tbody>
            {board.rows.map(r => (
              <tr
                key={r.submission}
                className={
                  r.mine ? (r.rank === best ? 'jp-NSML-mine jp-NSML-best' : 'jp-NSML-mine') : ''
                }
              >
                <td>{r.rank}</td>
                <td>{r.user}</td>
                <td title={`${r.session} ${r.checkpoint}`}>
                  {r.session.split('/').slice(1).join('/')}
                </td>
                <td>{formatMetric(r.score)}</td>
              </tr>
            ))}
          </tbody>
        </table>
      )}
      {best !== undefined && isFinite(best) && (
        <div className="jp-NSML-bestrank">Your best rank: #{best}</div>
      )}
      <h3 className="jp-NSML-section">My submissions</h3>
      {mine.length === 0 ? (
        <div className="jp-NSML-empty">None yet: “Submit” on a session of a dataset.</div>
      ) : (
        <ul className="jp-NSML-list" aria-label="My submissions">
          {[...mine].reverse().map(s => (
            <li key={s.id} className="jp-NSML-submission" data-state={s.state}>
              <div className="jp-NSML-row">
                <span className="jp-NSML-name">{s.session}</span>
                <span className={`jp-NSML-state jp-NSML-state-${s.state}`}>{s.state}</span>
              </div>
              <div className="jp-NSML-facts">
                <span>{s.dataset}</span>
                <span>{s.checkpoint}</span>
                {s.score !== null && <span>score {formatMetric(s.score)}</span>}
              </div>
              {s.message && <div className="jp-NSML-message">{s.message}</div>}
            </li>
          ))}
        </ul>
      )}
    </div>
  );
}
